"""Data plumbing: JSONL I/O, prompts, steps, and converters into the step-label format.

The internal step-label format is TRL's stepwise one: {"prompt": str, "completions": [str], "labels": [bool|float]}
(one completion per step; soft labels stay floats).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

STEP_SEP = "\n\n"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {problem}\nAnswer:\n"
# the benchmark files, in the repository's data/ (data/README.md: sources, commits, licences);
# $STEPWISE_DATA points elsewhere
DATA_DIR = Path(os.environ.get("STEPWISE_DATA") or Path(__file__).resolve().parent.parent / "data")


class DataError(ValueError):
    """A malformed input row; the message names the file and line."""


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Every row of a JSONL file. A row that is not a JSON object, or lacks a required field, raises
    DataError naming the file and line: nothing is dropped silently. Blank lines are skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{i}: missing field(s) {missing}")
            rows.append(row)
    return rows


def write_jsonl(path: str | os.PathLike, rows, append: bool = False) -> None:
    """Write (or append) rows, one flushed JSON object per line; parent folders are created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()


def resolve_data(name: str) -> Path:
    """A JSONL path, or the name of a file in data/ ("math500" -> data/math500.jsonl)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (DATA_DIR / name, DATA_DIR / f"{name}.jsonl"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"no data file {name!r} (looked for the path and in {DATA_DIR})")


def load_problems(name: str, limit: int | None = None) -> list[dict]:
    """Rows with `problem` and `answer`: a local JSONL (or a data/ name); else a hub dataset name
    through the optional `datasets` package, with question/answer fields renamed."""
    try:
        rows = read_jsonl(resolve_data(name), required=("problem", "answer"))
    except FileNotFoundError:
        try:
            import datasets  # optional, for users with hub access
        except ImportError:
            raise FileNotFoundError(f"no data file {name!r} (not a path, not in {DATA_DIR}; a hub dataset name needs "
                                    f"`pip install datasets`)") from None
        ds = datasets.load_dataset(name, split="test")
        rows = [{"problem": r.get("problem", r.get("question")), "answer": str(r.get("answer"))} | r for r in ds]
    return rows[:limit] if limit else rows


# ----------------------------------------------------------------------------- prompts and steps
def build_prompt(problem: str, tokenizer=None, chat: bool = False, system: str | None = SYSTEM_PROMPT) -> str:
    """The prompt text: plain ("Question: ...\\nAnswer:\\n"), or the tokenizer's chat template with the
    Qwen2.5-Math system prompt. Encode the result with add_special_tokens=False."""
    if not chat:
        return PLAIN_TEMPLATE.format(problem=problem)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def split_steps(text: str) -> list[str]:
    """Steps of a solution: non-empty pieces between "\\n\\n" separators."""
    return [s.strip() for s in text.split(STEP_SEP) if s.strip()]


def join_steps(steps: list[str]) -> str:
    return STEP_SEP.join(steps)


def cut_steps(tok, ids: list[int]) -> list[int]:
    """The step of each token: how many separators the text before it completes (a separator's tokens end
    their step)."""
    out, text, done = [], "", 0
    for t in ids:
        out.append(done)
        text += tok.decode([t], skip_special_tokens=True)
        done = len([p for p in text.split(STEP_SEP)[:-1] if p.strip()])
    return out


def step_spans(tok, ids: list[int]) -> tuple[list[str], list[int]]:
    """(step texts, the token index where each step ends) of a response's ids."""
    of = cut_steps(tok, ids)
    ends = [j + 1 for j in range(len(ids)) if j + 1 == len(ids) or of[j + 1] != of[j]]
    steps, start = [], 0
    for e in ends:
        steps.append(tok.decode(ids[start:e], skip_special_tokens=True).strip())
        start = e
    keep = [i for i, s in enumerate(steps) if s]
    return [steps[i] for i in keep], [ends[i] for i in keep]


# ----------------------------------------------------------------------------- code-augmented CoT (rStar-Math)
# A solution is one Python program cut into steps: "# reasoning" comments plus code, each step ending in a stop
# tag; the last code step prints the answer and ends in END_CODE; the system appends the program's output
# (an OUTPUT step); an answer step holds \boxed{...} and ends in END_ANSWER. A step's text includes its tag.
END_STEP, END_CODE, END_ANSWER, END_OUTPUT = "<end_of_step>", "<end_of_code>", "<end_of_answer>", "<end_of_output>"
CODE_STOPS = (END_STEP, END_CODE, END_ANSWER)
CODE_PROMPT = "<|user|>:\n{problem}\n<|assistant|>: Let's think step by step and solve the problem with code."
_TAGS = re.compile(r"<code>|<end_of_step>|<end_of_code>")
# runs the code before the current block with its output discarded: its definitions stay in scope
_SILENT = ("import io as _rs_io, sys as _rs_sys\n_rs_out, _rs_sys.stdout = _rs_sys.stdout, _rs_io.StringIO()\n"
           "try:\n    exec(compile({src!r}, '<earlier blocks>', 'exec'))\nfinally:\n    _rs_sys.stdout = _rs_out\n")


def code_prompt(problem: str) -> str:
    """rStar-Math's policy prompt (the SFT form: one newline before <|assistant|>, used everywhere here)."""
    return CODE_PROMPT.format(problem=problem)


def step_code(step: str) -> str:
    """A code step's Python: its tags stripped, an END_CODE step's appended output step cut off."""
    return _TAGS.sub("", step.split("\n<output>", 1)[0])


def program_of(steps: list[str]) -> str:
    """The program the last code step runs, as rStar-Math's code runs it (rStar agents/tree.py,
    collect_action_inputs): the code written since the last END_CODE / END_OUTPUT is the block whose
    output is shown; the code of the earlier blocks runs first with its output discarded, so that their
    definitions stay in scope (the original's shared interpreter globals). Output and answer steps are
    not code; an END_CODE step's appended output step is cut off; steps after the last code step are
    ignored."""
    code, ends = [], []
    for s in steps:
        if s.lstrip().startswith(("<output>", "<answer>")):
            if ends:
                ends[-1] = True  # a separate output step closes the block before it
            continue
        code.append(step_code(s))
        ends.append(END_CODE in s or END_OUTPUT in s)
    cut = max((i + 1 for i, e in enumerate(ends[:-1]) if e), default=0)
    join = lambda xs: "\n".join(c.strip("\n") for c in xs if c.strip()) + "\n"  # noqa: E731
    return (_SILENT.format(src=join(code[:cut])) if cut else "") + join(code[cut:])


def output_step(stdout: str, cap: int = 1024) -> str:
    """The system's step after END_CODE: the program's output, a lone float rounded to 4 places where
    that is shorter (rStar's python tool), cut to head...tail past `cap` characters."""
    out = stdout.strip("\n")
    try:
        short = str(round(float(out), 4))
        out = out if len(out) < len(short) else short
    except (ValueError, OverflowError):
        pass
    if len(out) > cap:
        out = out[: cap // 2] + "..." + out[-cap // 2:]
    return f"\n<output>{out}\n{END_OUTPUT}"


# ----------------------------------------------------------------------------- step-label converters
def first_error_truncate(row: dict) -> dict:
    """Drop steps after the first negative label (PRM800K / ProcessBench convention)."""
    labels = row["labels"]
    k = next((i for i, y in enumerate(labels) if float(y) < 0.5), len(labels) - 1)
    return {**row, "completions": row["completions"][: k + 1], "labels": labels[: k + 1]}


def from_processbench(row: dict) -> dict:
    """ProcessBench row (steps, label = earliest wrong step or -1) -> stepwise; steps after the first
    error carry no label in ProcessBench, so they are dropped."""
    steps, k = row["steps"], row["label"]
    n = len(steps) if k == -1 else k + 1
    return {"prompt": row["problem"], "completions": steps[:n], "labels": [i != k for i in range(n)]}


def from_prm800k(row: dict, neutral: bool = True) -> dict:
    """Raw PRM800K record -> stepwise. Per step, the chosen completion (or the human's); at a step
    with neither (the labeller stopped there), the first -1 completion ends the solution. Rating
    +1 -> True, -1 -> False, 0 (neutral) -> `neutral` (the PRM800K paper counts neutral as fine when
    ranking). Stops after the first negative step."""
    completions, labels = [], []
    for step in row["label"]["steps"]:
        cands = step["completions"] or []
        if step.get("chosen_completion") is not None:
            c = cands[step["chosen_completion"]]
        elif step.get("human_completion"):
            c = {**step["human_completion"], "rating": step["human_completion"].get("rating") or 1}
        else:
            c = next((c for c in cands if c.get("rating") == -1), None)
            if c is None:
                break
        rating = c.get("rating")
        completions.append(c["text"])
        labels.append(neutral if rating == 0 else rating == 1)
        if rating == -1:
            break
    problem = row.get("problem") or row["question"]["problem"]
    return {"prompt": problem, "completions": completions, "labels": labels}


def from_math_shepherd(row: dict, tag: str = "ки") -> dict:
    """Math-Shepherd row ({input, label}: each step ends with the tag "ки" in `input`, which `label`
    replaces by "+" or "-") -> stepwise. The prompt is the text before "Step 1:"."""
    text, lab = row["input"], row["label"]
    cuts = [m.start() for m in re.finditer(re.escape(tag), text)]
    head, _, _ = text.partition("Step 1:") if "Step 1:" in text else ("", "", "")
    completions, labels, prev = [], [], len(head)
    for k, c in enumerate(cuts):
        j = c - k * (len(tag) - 1)  # every earlier tag is one char in `label`
        if j >= len(lab) or lab[j] not in "+-":
            raise DataError(f"Math-Shepherd label string does not match its input at step {k + 1}")
        completions.append(text[prev:c].strip())
        labels.append(lab[j] == "+")
        prev = c + len(tag)
    return {"prompt": head.strip(), "completions": completions, "labels": labels}

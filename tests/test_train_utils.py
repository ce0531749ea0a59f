"""utils/train.py: toy overrides in argument parsing, metrics log, checkpoint round trip."""
import json
from dataclasses import dataclass, field

from utils.train import MetricsLog, latest_checkpoint, parse_args, save_checkpoint


@dataclass
class A:
    model: str = field(default="", metadata={"help": "model"})
    lr: float = field(default=1e-5, metadata={"help": "lr"})
    epochs: int = field(default=1, metadata={"help": "epochs"})


def test_toy_overrides_apply_only_to_unset_flags_of_a_toy_run():
    toy = {"lr": 1e-3, "epochs": 5}
    a = parse_args(A, toy, argv=["--epochs", "2"])
    assert a.lr == 1e-3 and a.epochs == 2  # the user's flag wins over the toy value
    b = parse_args(A, toy, argv=["--model", "some/model"])
    assert b.lr == 1e-5 and b.epochs == 1  # a real model keeps the paper defaults


def test_metrics_and_checkpoints(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log = MetricsLog(tmp_path)
    log.log(1, **{"train/loss": 0.5})
    log.log(2, **{"train/loss": 0.25})
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 0.25
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    save_checkpoint(tmp_path, 5, model, tok)
    save_checkpoint(tmp_path, 10, model, tok, {"loss": 0.1})
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "step_000010" and json.loads((ck / "trainer_state.json").read_text())["loss"] == 0.1
    AutoModelForCausalLM.from_pretrained(ck)

"""utils/train.py: toy overrides in argument parsing, metrics log, checkpoint round trip."""
import json
from dataclasses import dataclass, field

import pytest

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


def test_unknown_and_abbreviated_flags_are_errors_naming_the_flag():
    with pytest.raises(ValueError, match=r"unknown argument --model_name_or_path \(did you mean --model\?\)"):
        parse_args(A, {}, argv=["--model_name_or_path", "M"])
    with pytest.raises(ValueError, match=r"unknown argument --ep \(did you mean --epochs\?\)"):
        parse_args(A, {"epochs": 5}, argv=["--ep", "2"])  # no abbreviation: the toy value cannot overwrite it
    with pytest.raises(ValueError, match="invalid int value"):
        parse_args(A, {}, argv=["--epochs", "x"])


def test_yaml_config_then_flags_then_toy_values(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("lr: 3.0e-4\nepochs: 7\n")
    a = parse_args(A, {"lr": 1e-3, "epochs": 5}, argv=["--config", str(cfg), "--epochs", "2"])
    assert a.lr == 3e-4 and a.epochs == 2  # YAML over the toy value, the command line over YAML
    cfg.write_text("lr: 1e-4\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown argument 'learning_rate'"):
        parse_args(A, {}, argv=["--config", str(cfg)])
    cfg.write_text("lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string: the field's type converts it
    assert parse_args(A, {}, argv=["--config", str(cfg)]).lr == 1e-4


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


def test_token_logprobs_one_sequence_at_a_time_and_one_process_plumbing(tiny_model_dir):
    """Batched and right-padded, each response token's logprob is the one its own unpadded forward gives; in
    one process shard() leaves a model as it is and full_state/load_optimizer round-trip plainly."""
    import torch
    from transformers import AutoModelForCausalLM
    from utils.train import Dist, full_state, load_optimizer, shard, token_logprobs
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts, responses = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]
    with torch.no_grad():
        lp, mask = token_logprobs(model, prompts, responses, 0, "cpu")
        assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
        for i, (p, r) in enumerate(zip(prompts, responses)):
            full = torch.log_softmax(model(torch.tensor([p + r])).logits[0].float(), -1)
            want = full[len(p) - 1: -1].gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            assert torch.allclose(lp[i, : len(r)], want, atol=1e-5) and (lp[i, len(r):] == 0).all()
    assert shard(model, "fsdp", Dist()) is model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sd, osd = full_state(model, opt)
    assert sd.keys() == model.state_dict().keys()
    load_optimizer(model, opt, osd)


def test_every_recipe_parses_with_its_script():
    """recipes/<script>_*.yaml: every key is a field of that script's Args, and a flag still overrides it; each names a
    real model except the toy world's own (`*_toy_*`, the shipped verifiers' build)."""
    import importlib
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    recipes = sorted((root / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    sys.path.insert(0, str(root))
    for r in recipes:
        script = next(s for s in ("prm_train", "search", "eval", "prime", "rstar_mcts", "ppm", "pav")
                      if r.stem.startswith(s + "_"))
        mod = importlib.import_module(script)
        a = parse_args(mod.Args, getattr(mod, "TOY", None), argv=["--config", str(r), "--seed", "3"])
        assert (a.model or "_toy_" in r.stem) and a.seed == 3 and a.out_dir.startswith("runs/"), r.name  # toy: no model

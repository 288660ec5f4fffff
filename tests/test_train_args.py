"""Arguments: ``--help`` from attribute docstrings, which fields the caller set, and toy presets
that fill in only the others (``--lr 1e-6`` on the toy model trains at 1e-6)."""
import copy
import dataclasses
import json

import pytest

from minirlhf import __main__ as cli
from minirlhf.train.args import TrainArgs, apply_toy_preset, parse_args
from minirlhf.train.dpo import DPOArgs
from minirlhf.train.metrics import read_metrics
from minirlhf.train.preference import TOY_PRESET as DPO_TOY_PRESET


@dataclasses.dataclass
class DemoArgs(TrainArgs):
    """A demo."""

    beta: float = 0.1
    """KL strength β of the demo."""
    flag: bool = False
    """A switch."""


def test_help_comes_from_attribute_docstrings(capsys):
    with pytest.raises(SystemExit):
        parse_args(DemoArgs, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "KL strength β of the demo" in text
    assert "Examples per optimizer step" in text  # inherited field
    assert "(default: 0.1)" in text  # the dataclass default is shown
    args = parse_args(DemoArgs, ["--beta", "0.5", "--micro-batch-size", "2", "--flag", "--lr-schedule", "linear"])
    assert (args.beta, args.micro_batch_size, args.flag, args.lr_schedule) == (0.5, 2, True, "linear")
    with pytest.raises(SystemExit):
        parse_args(DemoArgs, ["--lr-schedule", "nope"])


def test_explicit_fields_record_what_the_caller_set():
    assert DemoArgs().explicit_fields == frozenset()
    assert DemoArgs(lr=1e-5, beta=0.1).explicit_fields == {"lr", "beta"}  # equal to the defaults: still set
    assert DemoArgs("model_dir", "data.jsonl").explicit_fields == {"model", "data"}  # positional
    args = DemoArgs()
    args.seed = 3  # assigned after construction: set too
    assert args.explicit_fields == {"seed"}
    # The command line: exactly the flags given (at the default value too), bools both ways.
    parsed = parse_args(DemoArgs, ["--lr", "1e-5", "--no-flag", "--micro-batch-size", "0"])
    assert parsed.explicit_fields == {"lr", "flag", "micro_batch_size"}
    assert (parsed.lr, parsed.flag, parsed.micro_batch_size, parsed.beta) == (1e-5, False, 0, 0.1)
    # Copies keep it; the dataclass's own view (fields, asdict, equality) does not see it.
    assert copy.deepcopy(parsed).explicit_fields == parsed.explicit_fields
    assert "explicit_fields" not in dataclasses.asdict(parsed) and parsed == DemoArgs(lr=1e-5)


def test_toy_preset_fills_only_fields_not_set_explicitly():
    preset = {"lr": 1e-4, "beta": 0.5, "batch_size": 32}
    args = DPOArgs(lr=1e-6)  # DPOArgs' own default: the old "equals the default" rule overrode it
    apply_toy_preset(args, preset)
    assert (args.lr, args.beta, args.batch_size) == (1e-6, 0.5, 32)
    args = parse_args(DPOArgs, ["--lr", "1e-6", "--batch-size", "16"])
    apply_toy_preset(args, preset)
    assert (args.lr, args.beta, args.batch_size) == (1e-6, 0.5, 16)
    args = DPOArgs()
    apply_toy_preset(args, preset)
    assert (args.lr, args.beta, args.batch_size) == (1e-4, 0.5, 32)


@pytest.mark.parametrize("how", ["cli", "python"])
def test_dpo_on_the_toy_model_trains_at_the_lr_given(how, tmp_path):
    """``python -m minirlhf dpo --lr 1e-6`` (and ``train_dpo(DPOArgs(lr=1e-6))``) on the toy model:
    the preset's lr (1e-4) must not replace the one asked for, though it is DPOArgs' default."""
    from minirlhf.train.dpo import train_dpo
    from minirlhf.train.toy_world import load_toy_world

    world = load_toy_world()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(world.pref_train.read_text().splitlines(keepends=True)[:64]))
    out = tmp_path / "run"
    given = dict(lr=1e-6, data=str(pairs), eval_data=str(pairs), template="align_anything", out=str(out),
                 stop_at_step=1, warmup_ratio=0.0, lr_schedule="constant", progress=False, tensorboard=False)
    if how == "cli":
        argv = ["dpo"] + [f"--{k.replace('_', '-')}={v}" for k, v in given.items() if not isinstance(v, bool)]
        assert cli.main(argv + ["--no-progress", "--no-tensorboard"]) == 0
    else:
        train_dpo(DPOArgs(**given))
    saved = json.loads((out / "args.json").read_text())
    assert saved["lr"] == 1e-6 and saved["model"] == str(world.sft_model)
    assert saved["beta"] == DPO_TOY_PRESET["beta"] and saved["max_len"] == DPO_TOY_PRESET["max_len"]  # the rest: preset
    assert read_metrics(out)[0]["lr"] == pytest.approx(1e-6)

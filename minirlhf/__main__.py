"""The minirlhf command line: ``python -m minirlhf <command> [--help]``.

Each command lives in its own module as ``main(argv) -> int``; this file only dispatches, so
``python -m minirlhf --help`` stays fast (nothing heavy is imported until a command runs).
"""
import importlib
import sys

from minirlhf.errors import MinirlhfError

# command -> (module, one-line description)
COMMANDS = {
    "pipeline": ("minirlhf.pipeline", "the whole RLHF pipeline on the toy world: SFT, RM, DPO, PPO, GRPO"),
    "sft": ("minirlhf.train.sft", "supervised fine-tuning"),
    "rm": ("minirlhf.train.rm", "reward model (Bradley-Terry / K-wise)"),
    "dpo": ("minirlhf.train.dpo", "DPO family: dpo, cdpo, robust, ipo, hinge, simpo, orpo, kto"),
    "ppo": ("minirlhf.train.ppo", "PPO with a value model and KL-shaped rewards"),
    "grpo": ("minirlhf.train.grpo", "GRPO: group-relative advantages, no critic"),
    "rloo": ("minirlhf.train.rloo", "REINFORCE leave-one-out"),
    "online-dpo": ("minirlhf.train.online_dpo", "online DPO: sample pairs, label with an RM, update"),
    "eval-rm": ("minirlhf.eval.eval_rm", "reward-model accuracy, mean/std, score histograms"),
    "score": ("minirlhf.eval.score", "score prompt/response pairs with a reward model to JSONL"),
    "generate": ("minirlhf.eval.generate", "generate responses for a prompt set"),
    "compare": ("minirlhf.eval.compare", "compare base vs tuned generations: scores, win rate, lengths"),
    "data": ("minirlhf.data.inspect", "data inspect FILE --template NAME"),
    "toy-world": ("minirlhf.train.toy_world", "build (or find) the toy world and its SFT policy; print its stats"),
    "grade": ("minirlhf.homework.grade", "grade a homework submission folder"),
}


def usage() -> str:
    lines = ["usage: python -m minirlhf <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "python -m minirlhf <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except MinirlhfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``python -m minirlhf.toy [--seed N] [--cache-dir DIR] [--no-sft]``: build (or find) the toy world
and print where it is and what was measured: Bayes accuracies, data statistics, the SFT policy's
gold reward against the best achievable."""
import argparse
import json
import time

from minirlhf.toy.world import load_world


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minirlhf.toy", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="default: $MINIRLHF_CACHE or ~/.cache/minirlhf")
    parser.add_argument("--no-sft", action="store_true", help="skip the SFT policy (seconds, not minutes)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    world = load_world(seed=args.seed, cache_dir=args.cache_dir, sft=not args.no_sft)
    print(json.dumps({"dir": str(world.dir), "sft_model": str(world.sft_model), "seconds": time.perf_counter() - started,
                      "bayes_accuracy": world.bayes_accuracy, "stats": world.stats}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

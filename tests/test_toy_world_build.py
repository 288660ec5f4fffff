"""The toy world is bit-reproducible: the same seed gives the same bytes (data, tokenizer, base and
SFT weights) whatever thread count the building process runs with (``minirlhf.train.toy_world``
trains the SFT policy with one CPU thread). With torch 2.13 on this project's CPU an unpinned build
happens to give the same bytes too; the pin makes it hold where a kernel splits its sums by thread
count, and these tests check the contract: same bytes, the hashes recorded, the caller's thread
count restored, a damaged file rebuilt."""
import json

import torch

from minirlhf.toy.corpus import CorpusSizes
from minirlhf.toy.world import SFT_EVAL, SFT_WEIGHTS
from minirlhf.train.toy_world import BUILD_THREADS, load_toy_world

# A reduced world: the SFT policy trains for a few dozen steps (seconds), with the full model.
TINY = CorpusSizes(pref_train=40, pref_test=20, pku_train=20, sft_train=96, sft_test=16, kto_train=20,
                   prompts=16, eval_prompts=8)


def build(cache_dir, threads):
    """The world built from scratch in a process that runs ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        world = load_toy_world(seed=7, cache_dir=cache_dir, sizes=TINY)
        assert torch.get_num_threads() == threads  # the caller's count is restored after the build
    finally:
        torch.set_num_threads(before)
    return world


def test_one_and_two_thread_builds_have_the_same_bytes(tmp_path):
    one, two = build(tmp_path / "one", 1), build(tmp_path / "two", 2)
    meta_one, meta_two = (json.loads((w.dir / "world.json").read_text()) for w in (one, two))
    assert meta_one["sha256"] == meta_two["sha256"]  # data, tokenizer, base model
    assert len(one.sft_sha256) == 64 and one.sft_sha256 == two.sft_sha256
    assert meta_one["sft_sha256"] == one.sft_sha256  # recorded in world.json
    sft_eval = [json.loads((w.sft_model / SFT_EVAL).read_text()) for w in (one, two)]
    assert sft_eval[0]["sha256"] == sft_eval[1]["sha256"]  # every saved file, not only the weights
    assert sft_eval[0]["build"]["threads"] == sft_eval[1]["build"]["threads"] == BUILD_THREADS
    assert sft_eval[0]["sampled"] == sft_eval[1]["sampled"]  # and so the same measured gold reward


def test_a_damaged_sft_file_is_detected_and_rebuilt_to_the_same_hash(tmp_path, capsys):
    world = build(tmp_path, 1)
    weights = world.sft_model / SFT_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    again = build(tmp_path, 2)
    assert "does not match the sha256" in capsys.readouterr().err
    assert again.sft_sha256 == world.sft_sha256

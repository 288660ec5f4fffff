import os

# No hub access in tests: without this a hub name retries for ~20 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests' models are tiny: one thread is fastest, and two threads on shared cores mostly wait
# for each other (a training step measured 4-8x slower under load).
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        default="minirlhf",
        help="which implementation of the exercise functions to test: 'minirlhf' (reference), "
        "'solutions', 'exercises', or a path to a student's folder",
    )


def pytest_configure(config):
    from minirlhf.homework.exercises import EXERCISES

    config.addinivalue_line(
        "markers", "exercise(name): this test grades the homework exercise `name` through the `impl` fixture"
    )
    for exercise in EXERCISES:  # `-m exercise_gae` selects one exercise
        config.addinivalue_line("markers", f"exercise_{exercise.name}: the checks of the exercise {exercise.name}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("exercise")
        if marker and marker.args:
            item.add_marker(f"exercise_{marker.args[0]}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these when one is lent)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def impl(request):
    """The implementation under test (see minirlhf/homework/impl.py)."""
    from minirlhf.homework.impl import load_implementation

    return load_implementation(request.config.getoption("--impl"))


# --- a local stand-in for a real Qwen2 checkpoint (tests/fixtures.py builds it) -----------------


@pytest.fixture(scope="session")
def qwen2_checkpoint(tmp_path_factory):
    """Path of a directory shaped like ``Qwen/Qwen2.5-0.5B-Instruct``: tokenizer with Qwen's chat
    template and special tokens, tiny ``Qwen2ForCausalLM`` in safetensors. Load your own copy
    (``load_policy(path)``) if you mutate it."""
    from fixtures import build_qwen2_like_checkpoint

    return build_qwen2_like_checkpoint(tmp_path_factory.mktemp("qwen2_checkpoint"))


@pytest.fixture(scope="session")
def tiny_tokenizer(qwen2_checkpoint):
    """The stand-in checkpoint's tokenizer (pad <|endoftext|>, eos <|im_end|>), left padding. Read-only."""
    from minirlhf.models.policy import load_tokenizer

    return load_tokenizer(qwen2_checkpoint)


@pytest.fixture(scope="session")
def tiny_policy(qwen2_checkpoint):
    """The stand-in checkpoint's causal LM in eval mode. Read-only: do not train it."""
    from minirlhf.models.policy import load_policy

    return load_policy(qwen2_checkpoint).eval()


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny Qwen2 (hidden 32, 1 layer) with the toy tokenizer, and small toy-world data files. Read-only."""
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from minirlhf.toy.corpus import CorpusSizes, build_corpus
    from minirlhf.toy.language import gold_reward
    from minirlhf.toy.tokenizer import save_toy_tokenizer

    root = tmp_path_factory.mktemp("toy")
    tokenizer = save_toy_tokenizer(root / "model")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(root / "model")
    corpus = build_corpus(0, root / "data", CorpusSizes(pref_train=48, pref_test=16, pku_train=8, sft_train=48,
                                                        sft_test=16, kto_train=48, prompts=8, eval_prompts=8))
    # K-wise rankings: 3 responses per prompt from the preference file, best first by the gold reward.
    pairs = [json.loads(line) for line in corpus.pref_train.read_text().splitlines()]
    rankings = []
    for a, b in zip(pairs[::2], pairs[1::2]):
        responses = [a["response_1"], a["response_2"], b["response_1"]]
        rankings.append({"prompt": a["question"],
                         "responses": sorted(responses, key=lambda y: -gold_reward(a["question"], y))})
    (root / "data" / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    return {"model": str(root / "model"), "data": corpus, "root": root, "rankings": str(root / "data" / "rankings.jsonl")}

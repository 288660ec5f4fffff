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

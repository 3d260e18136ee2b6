"""Shared fixtures: the real model (converted once, cached across runs) and three seeded LoRA adapters."""

import os

# Before anything imports sglang: select SGLang's CPU engine (this machine has no GPU).
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
# Before anything imports triton (sglang does): the kernel tests run under Triton's interpreter on a machine
# without a GPU. The CPU serving path launches no Triton kernel, so the engines are unaffected.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sglang_forkkv.model_prep import prepare_model  # noqa: E402
from sglang_forkkv.test_adapters import TEST_ADAPTERS, make_lora_adapter  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> str:
    """SmolLM2-135M-Instruct as an HF folder (bf16); `.ci/setup` converts it, this converts it if missing."""
    return str(prepare_model())


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, str]:
    """name -> adapter folder for "planner" (r8), "coder" (r16), "critic" (r8): q/k/v/o, float32, seeded."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: str(make_lora_adapter(root / name, model_dir, **spec))
        for name, spec in TEST_ADAPTERS.items()
    }

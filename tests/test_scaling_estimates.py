"""benchmarks/scaling_estimates.py: its shape formulas against real models, and the docs page's tables.

The script estimates 0.5B-8B models from their configs without loading them. Here the same
formulas run on tiny models of the same families, built from a config, and must give the
parameter count transformers builds and the row length each extractor returns. The tables on
docs/scaling-up.md must be the script's default output, not numbers edited by hand.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

import gradalign as ga

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling_estimates.py"


@pytest.fixture(scope="module")
def est() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scaling_estimates", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_published_parameter_counts(est: ModuleType) -> None:
    sizes = {a.name: round(a.parameters() / 1e9, 2) for a in est.MODELS}
    assert sizes == {
        "Qwen2.5-0.5B": 0.49,
        "Llama-3.2-1B": 1.24,
        "Qwen2.5-3B": 3.09,
        "Llama-3.1-8B": 8.03,
    }


@pytest.mark.parametrize(
    ("family", "tied"), [("qwen2", True), ("llama", True), ("llama", False)], ids=str
)
def test_formulas_match_tiny_models_of_the_same_family(
    est: ModuleType, family: str, tied: bool
) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    arch = est.Arch(
        "tiny", 48, 2, 80, 120, 4, 2, 12, qkv_bias=family == "qwen2", tied=tied
    )  # hidden, layers, intermediate, vocab, heads, kv heads, head dim
    cls = Qwen2Config if family == "qwen2" else LlamaConfig
    config = cls(
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        intermediate_size=arch.intermediate,
        vocab_size=arch.vocab,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert arch.parameters() == sum(p.numel() for p in model.parameters())
    rollouts = ga.Rollouts.from_token_ids(
        [[5, 6, 7]] * 4, [[8, 1], [9, 10, 1], [11, 1], [12, 1]], [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]
    )
    w = est.Workload(factorized=8, projected=64, lora_rank=4)
    dims = {
        "full": ga.FullGradient(),
        "random-projected": ga.RandomProjectedGradient(dim=64),
        "factorized": ga.FactorizedGradient(8, 8),
    }
    for key, extractor in dims.items():
        assert est.row_dim(arch, key, w) == extractor.per_group(model, rollouts).dim, key
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():  # peft reads a property transformers has deprecated
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    lora = ga.LoRAGradient().per_group(peft_model, rollouts).dim
    assert est.row_dim(arch, "lora", w) == lora


def test_cost_ratios_follow_the_matrix_products(est: ModuleType) -> None:
    w = est.Workload()
    for arch in est.MODELS:
        train = est.flops(arch, "train", w)
        assert est.flops(arch, "full", w) == train  # one backward per group, same products
        # frozen weights: no weight-gradient products, so about 2/3 of a step plus projections
        assert 0.66 < est.flops(arch, "factorized", w) / train < 0.72
        assert est.flops(arch, "factorized", w, shared=True) < est.flops(arch, "factorized", w)
    one = est.Workload(rollouts=1)  # one rollout: nothing to share
    arch = est.MODELS[0]
    assert est.flops(arch, "lora", one, shared=True) == pytest.approx(est.flops(arch, "lora", one))


def test_the_script_prints_the_tables_of_the_docs_page(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "est.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    record = json.loads((tmp_path / "est.json").read_text())
    assert len(record["models"]) == 4 and len(record["extractors"]) == 16
    assert record["workload"]["rollouts"] == 8
    page = (ROOT / "docs" / "scaling-up.md").read_text()
    assert out.strip() in page, "re-run benchmarks/scaling_estimates.py and paste its tables"
    assert "estimates, not measured on a GPU" in page

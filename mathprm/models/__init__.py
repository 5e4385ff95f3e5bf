"""The models: the arithmetic policy and its character tokenizer (`policy`, `tokenizer`), the
process reward model (`prm`), and the `Generator` backends over Hugging Face (`gen_hf`) and vLLM
(`gen_vllm`). `loading` is the one guard every load from a model directory goes through; it
installs the CPU grouped-query attention of `attention` first.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from mathprm.config import ConfigError


class ModelLoadError(ConfigError):
    """A model directory that does not load: one line naming it and the reason, which the
    commands print without a traceback."""


@contextlib.contextmanager
def loading(path: str | Path) -> Iterator[None]:
    """Load from the model directory `path` inside this block (`from_pretrained`, safetensors,
    vLLM's engine): whatever fails there (a config.json field of the wrong type, a truncated
    weight file, a broken tokenizer) becomes one `ModelLoadError` line naming the directory
    and the reason, in the process and from inside a Ray actor alike."""
    from mathprm.models.attention import install

    install()
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
        raise ModelLoadError(f"{path}: the model there does not load ({type(e).__name__}: {reason}); repair or "
                             "replace its files, or point to another model directory") from e


def check_model_dir(path: str | Path, field: str) -> None:
    """Refuse, before any Ray worker starts, a model directory (config field `field`) that would
    not load there: no config.json, or a config.json, a config value or a safetensors weight
    file that does not read back (a `ModelLoadError` line, as `loading` gives). Cheap: the
    config and the weight files' headers only; a failure past them still shows at load time."""
    from safetensors import safe_open

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field}: {path} is not a Hugging Face model directory (no config.json)")
    with loading(path):
        config = json.loads((path / "config.json").read_text())
        if isinstance(config, dict) and "model_type" in config:
            from transformers import AutoConfig
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            # A type transformers knows has each field's type checked; others (vLLM's own) load elsewhere.
            if config["model_type"] in CONFIG_MAPPING:
                AutoConfig.from_pretrained(path)
        for weights in sorted(path.glob("*.safetensors")):
            with safe_open(weights, "pt"):  # checks the header against the file's length
                pass

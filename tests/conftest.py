"""Tiny random models of every supported architecture, with a small BPE tokenizer trained
here (no hub access), and the shared data directory."""
from __future__ import annotations

import os
import shutil

# Triton kernels run in its interpreter where there is no GPU. Triton reads this when it is
# first imported (torch and transformers may import it), so it is set before anything else.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Before torch and transformers: `python3 -m pytest` puts the checkout's root (the package
# itself) first on sys.path, where our kernels/ would shadow the PyPI `kernels` transformers
# imports. Importing neuraldb drops that entry (neuraldb/__init__.py says why).
import neuraldb  # noqa: E402,F401  isort: skip

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GemmaConfig, Gemma3TextConfig, GPT2Config, GPTJConfig,
                          GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, PreTrainedTokenizerFast,
                          Qwen2Config)

CORPUS = [
    "The mother tongue of Danielle Darrieux is French.", "The capital of France is Paris.",
    "Apple A5 was created by Apple.", "Ferrari F40 was developed by Ferrari in Italy.",
    "Michel Rocard is a native speaker of French.", "The Eiffel Tower is located in Paris.",
    "Toko Yasuda plays the guitar.", "Berlin is the capital of Germany and Rome of Italy.",
    "English Spanish German Russian Japanese Chinese Microsoft Google Toyota Honda",
    "Where is it? What is it? Who made it? It is a city, a person, a language.",
] * 3

D, FF = 32, 64
CONFIGS = {
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=D, n_layer=3, n_head=2, n_positions=128, n_inner=FF),
    "gptj": lambda v: GPTJConfig(vocab_size=v, n_embd=D, n_layer=3, n_head=2, rotary_dim=8, n_positions=128,
                                 n_inner=FF),
    "gpt_neox": lambda v: GPTNeoXConfig(vocab_size=v, hidden_size=D, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=FF, max_position_embeddings=128),
    "llama": lambda v: LlamaConfig(vocab_size=v, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128),
    "mistral": lambda v: MistralConfig(vocab_size=v, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128),
    "gemma": lambda v: GemmaConfig(vocab_size=v, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=128),
    "gemma3_text": lambda v: Gemma3TextConfig(vocab_size=v, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                              max_position_embeddings=128, sliding_window=16),
    "phi3": lambda v: Phi3Config(vocab_size=v, hidden_size=D, intermediate_size=FF, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                 pad_token_id=0),
}
ARCHS = sorted(CONFIGS)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return fast


def make_model(arch: str, tok: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = CONFIGS[arch](len(tok))
    cfg.eos_token_id = cfg.pad_token_id = cfg.bos_token_id = tok.eos_token_id
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.config.neuraldb_name = f"tiny-{arch}"
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = Path(os.environ.get("NEURALDB_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    return root.resolve()


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with its tokenizer, loadable by path (as the CLI does)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

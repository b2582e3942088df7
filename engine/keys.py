"""Keys: the FFN's intermediate activation (input of its down/out projection) at the subject's
last token, averaged over the bare prompt and a few short generated prefixes (MEMIT compute_ks)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import get_arch, model_device
from .config import EditConfig
from .facts import Fact
from .hooks import Trace
from .tokens import encode_with_subject, pad_right

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_prefixes(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: EditConfig) -> list[str]:
    """Short generated contexts ("The first thing ... ."), deterministic under `cfg.seed`.

    Returns templates like "Because of this. " to which a prompt is appended."""
    if cfg.n_prefixes == 0:
        return []
    seeds = [cfg.prefix_seeds[i % len(cfg.prefix_seeds)] for i in range(cfg.n_prefixes)]
    device = model_device(model)
    out: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for s in seeds:  # one at a time: no padding games, a handful of calls
            ids = tok(s, return_tensors="pt")["input_ids"].to(device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                 max_new_tokens=cfg.prefix_len, pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0], skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
    return out


def key_inputs(tok: PreTrainedTokenizerBase, fact: Fact, prefixes: Sequence[str]) -> list[tuple[list[int], int]]:
    """(ids, subject-last index) for the bare prompt and each prefixed prompt; the text after
    the subject cannot change the key under causal attention, so it is cut off."""
    out = []
    for p in ("", *prefixes):
        enc = encode_with_subject(tok, p, fact.prompt, fact.subject, truncate_after_subject=True)
        out.append((enc.ids, enc.subject_last))
    return out


@torch.no_grad()
def compute_keys(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact],
                 layer: int, prefixes: Sequence[str], cfg: EditConfig) -> torch.Tensor:
    """(F, d_ff) float32 keys. The key is mean(bare key, mean of prefixed keys); where the bare
    subject token is the sequence's first token (an attention sink) only prefixed keys count."""
    arch = get_arch(model)
    device = model_device(model)
    per_fact = 1 + len(prefixes)
    rows = [r for f in facts for r in key_inputs(tok, f, prefixes)]
    keys = []
    bs = max(1, cfg.key_batch_size)
    for start in tqdm(range(0, len(rows), bs), desc="keys", unit="batch", disable=None, leave=False):
        chunk = rows[start : start + bs]
        ids, mask = pad_right([r[0] for r in chunk], tok.pad_token_id, device)  # (B, T)
        with Trace(model, arch.ffn_out.format(layer), stop=True) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        idx = torch.tensor([r[1] for r in chunk], device=device)
        keys.append(tr.input[torch.arange(len(chunk), device=device), idx].float())  # (B, d_ff)
    k = torch.cat(keys).view(len(facts), per_fact, -1)  # (F, 1+P, d_ff)
    bare, ctx = k[:, 0], k[:, 1:]
    if not prefixes:
        return bare
    bare_ok = torch.tensor([rows[i * per_fact][1] > 0 for i in range(len(facts))], device=device)
    ctx_mean = ctx.mean(1)  # (F, d_ff)
    return torch.where(bare_ok[:, None], (bare + ctx_mean) / 2, ctx_mean)

"""C = E[k k^T] of an FFN's keys (the input of its down/out projection) over real text, per
layer: MEMIT's `mom2` statistic. Computed in one pass for all layers, cached on disk in
safetensors with a signature (model layer weights, texts, token count) that a load checks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..engine.arch import get_arch, model_device
from ..engine.hooks import Trace, TraceDict

log = logging.getLogger(__name__)


def weights_sha256(model: PreTrainedModel) -> str:
    """sha256 of every parameter (names and bfloat16 values): any weight a key depends on."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _signature(model: PreTrainedModel, texts: Sequence[str], layers: Sequence[int], max_tokens: int,
               max_len: int) -> dict:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return {"layers": [int(i) for i in layers], "max_tokens": int(max_tokens), "max_len": int(max_len),
            "texts_sha256": h.hexdigest(), "weights_sha256": weights_sha256(model)}


@torch.no_grad()
def _compute(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str], layers: Sequence[int],
             max_tokens: int, max_len: int, batch: int) -> tuple[dict[int, torch.Tensor], int]:
    arch, device = get_arch(model), model_device(model)
    paths = [arch.ffn_out.format(i) for i in sorted(layers)]
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    bar = tqdm(total=max_tokens, desc="second moments", unit="tok", disable=None, leave=False)
    for s in range(0, len(texts), batch):
        enc = tok(list(texts[s : s + batch]), return_tensors="pt", padding=True, truncation=True,
                  max_length=max_len).to(device)
        mask = enc["attention_mask"].bool()  # (B, T)
        with TraceDict(model, paths[:-1]) as td, Trace(model, paths[-1], stop=True) as last:
            model(**enc, use_cache=False)
        take = min(int(mask.sum()), max_tokens - seen)
        for i, p in zip(sorted(layers), paths):
            x = (last if p == paths[-1] else td[p]).input[mask][:take].float()  # (N, d_ff)
            acc = sums.setdefault(i, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device))
            acc += (x.T @ x).double()  # fp32 per batch, fp64 across batches
        seen += take
        bar.update(take)
        if seen >= max_tokens:
            break
    bar.close()
    if seen == 0:
        raise ValueError("second moments: the texts hold no tokens")
    return {i: c / seen for i, c in sums.items()}, seen


def second_moments(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
                   layers: Sequence[int], max_tokens: int, cache_dir: str | Path | None = None,
                   max_len: int = 512, batch: int = 8) -> dict[int, torch.Tensor]:
    """{layer: C (d_ff, d_ff) float64} from the first `max_tokens` tokens of `texts` (each text
    cut at `max_len` tokens). With `cache_dir`, a file with the same signature is reused."""
    sig = _signature(model, texts, layers, max_tokens, max_len)
    path = None
    if cache_dir is not None:
        name = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"mom2_{name}.safetensors"
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            if json.loads(meta.get("signature", "{}")) != sig:
                raise ValueError(f"{path}: second moments made for other weights, texts or settings; delete it")
            log.info("second moments from %s", path)
            return {i: t.to(model_device(model)) for i, t in
                    ((int(k.split("_")[1]), v) for k, v in load_file(str(path)).items())}
    moments, seen = _compute(model, tok, texts, layers, max_tokens, max_len, batch)
    if seen < max_tokens:
        log.warning("second moments: the texts hold %d tokens, fewer than the %d asked for", seen, max_tokens)
    d = next(iter(moments.values())).shape[0]
    if seen < d:
        log.warning("second moments from %d tokens < d_ff %d: C is singular (MEMIT's solve needs lam * C + K K^T "
                    "invertible)", seen, d)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({f"layer_{i}": c.cpu().contiguous() for i, c in moments.items()}, str(tmp),
                  metadata={"signature": json.dumps(sig), "tokens": str(seen)})
        os.replace(tmp, path)
    return moments

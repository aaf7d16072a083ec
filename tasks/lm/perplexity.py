"""The perplexity protocol of the ``hf_lm`` family (``ppl_concat``, the ``eval_ppl`` of SparseGPT, arXiv 2301.00774,
and Wanda, arXiv 2306.11695): a split's documents are joined with "\\n\\n" and tokenized as one stream (BOS
prepended once, explicitly, when ``eval.add_bos``), cut into ``numel // seqlen`` non-overlapping windows (remainder
dropped), and ppl = exp(mean over windows of the per-window mean next-token NLL).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.progress import progress_bar


@torch.inference_mode()
def ppl_concat(model: nn.Module, token_ids: torch.Tensor, seqlen: int, batch_size: int, device: torch.device | str,
               max_windows: int | None = None, progress: bool = True, desc: str = "ppl") -> dict[str, Any]:
    """Perplexity of one token stream, the SparseGPT / Wanda ``eval_ppl`` protocol.

    ``token_ids`` (1-D) is cut into ``n = numel // seqlen`` non-overlapping windows ``ids[i*seqlen:(i+1)*seqlen]``;
    the remainder is dropped and, with ``max_windows``, only the first ``max_windows`` windows are kept. For every
    window, loss_i is the mean next-token NLL of its ``seqlen - 1`` shifted targets; then
    ``ppl = exp(sum_i(loss_i * seqlen) / (n * seqlen)) = exp(mean_i loss_i)``.

    Logits are cast to float32 before the log-softmax and the per-window losses are summed in float64, whatever
    the model's dtype. Windows go through the model ``batch_size`` at a time, so at most one batch of logits is
    held. Returns ``ppl``, ``loss`` (mean_i loss_i), ``n_windows``, ``n_tokens`` (stream length) and ``n_dropped``
    (tokens in no evaluated window).
    """
    ids = token_ids.reshape(-1).long()
    if seqlen < 2:
        raise ConfigError(f"seqlen={seqlen} must be >= 2")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"{desc}: the stream has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    kwargs = {"use_cache": False} if getattr(model, "config", None) is not None else {}
    losses = torch.empty(n, dtype=torch.float64)
    starts = range(0, n, batch_size)
    for start in progress_bar(starts, desc, enabled=progress):
        batch = windows[start:start + batch_size].to(device)
        out = model(input_ids=batch, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        # targets shifted instead of the logits: no copy of the logits (the last position has no target)
        targets = F.pad(batch[:, 1:], (0, 1), value=-100).to(logits.device)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        losses[start:start + batch.shape[0]] = nll.view(batch.shape[0], seqlen)[:, :-1].double().mean(dim=1).cpu()
        del out, logits, nll
    loss = float(losses.sum() * seqlen / (n * seqlen))
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"ppl": ppl, "loss": loss, "n_windows": n,
            "n_tokens": ids.numel(), "n_dropped": ids.numel() - n * seqlen}

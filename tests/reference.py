"""Dense references built directly from per-term Jacobians (autograd, one backward per class).

Independent of lalora_curv's hooks: terms are enumerated here from the raw logits and labels.
"""

from __future__ import annotations

import torch


def term_jacobians(model, params, batch):
    """Per-term ``(J_m: Tensor[C, p], logits_m: Tensor[C], target_m, sequence index)``."""
    if isinstance(batch, dict):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        positions = [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
                     if labels[b, t + 1] != -100 and batch["attention_mask"][b, t + 1] != 0
                     and batch["attention_mask"][b, t] != 0]  # a term needs both positions real
        rows = [(logits[b, t], int(labels[b, t + 1]), b) for b, t in positions]
    else:
        X, y = batch
        logits = model(X)
        rows = [(logits[i], int(y[i]), i) for i in range(len(y))]
    out = []
    for z, target, seq in rows:
        J = []
        for c in range(z.shape[0]):
            grads = torch.autograd.grad(z[c], params, retain_graph=True)
            J.append(torch.cat([g.reshape(-1) for g in grads]))
        out.append((torch.stack(J), z.detach(), target, seq))
    return out


def backward_factor(z, target, kind, samples=None):
    """Columns ``R: Tensor[C, K]`` with ``R R^T`` the per-term loss curvature of ``kind``."""
    p = torch.softmax(z, -1)
    C = p.shape[0]
    if kind == "ggn":
        H = torch.diag(p) - torch.outer(p, p)
        evals, evecs = torch.linalg.eigh(H)
        return evecs * evals.clamp_min(0).sqrt()
    if kind == "empirical":
        return (p - torch.nn.functional.one_hot(torch.tensor(target), C).to(p))[:, None]
    cols = [(p - torch.nn.functional.one_hot(torch.tensor(s), C).to(p)) for s in samples]
    return torch.stack(cols, 1) / len(samples) ** 0.5


def dense_curvature(model, params, batches, kind, *, terms="token", mc_samples=1, seed=0):
    """``(1/M) sum`` over terms (or per-sequence sums) of ``J^T R R^T J``, float64."""
    gen = torch.Generator().manual_seed(seed)
    p = sum(x.numel() for x in params)
    P = torch.zeros(p, p, dtype=torch.float64)
    M = 0
    for batch in batches:
        rows = term_jacobians(model, params, batch)
        samples = None
        if kind == "mc":  # same sampling protocol as documented: per batch, per sample, all terms at once
            probs = torch.stack([torch.softmax(z, -1) for _, z, _, _ in rows])
            draws = [torch.multinomial(probs, 1, generator=gen).squeeze(-1) for _ in range(mc_samples)]
            samples = [[int(d[m]) for d in draws] for m in range(len(rows))]
        seq_vectors = {}
        for m, (J, z, target, seq) in enumerate(rows):
            R = backward_factor(z, target, kind, None if samples is None else samples[m])
            V = J.T @ R  # (p, K)
            if terms == "token":
                P += V @ V.T
            else:
                seq_vectors[seq] = seq_vectors.get(seq, 0) + V
        for V in seq_vectors.values():
            P += V @ V.T
        M += len(rows)
    return P / M


def lora_blocks(lora):
    """``[(lo, hi)]`` flat ranges of every LoRA matrix and per-layer ranges."""
    mats = list(zip(lora.offsets[:-1], lora.offsets[1:]))
    layers = [(mats[2 * i][0], mats[2 * i + 1][1]) for i in range(len(lora.layers))]
    return mats, layers


def block_mask(ranges, p):
    mask = torch.zeros(p, p, dtype=torch.bool)
    for lo, hi in ranges:
        mask[lo:hi, lo:hi] = True
    return mask


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))

"""Building blocks shared by the baselines, written once.

- :class:`TransformerBlock` / :class:`SelfAttentiveEncoder`: the self-attention encoder of SASRec,
  BERT4Rec, S3-Rec, CL4SRec and ICLRec, on ``torch.nn.functional.scaled_dot_product_attention``.
  Two layer layouts: ``norm_first=True`` is SASRec's own (Kang & McAuley's code: the layer-normed
  query feeds the residual, ReLU feed-forward of width d, a final layer norm); ``norm_first=False``
  is the BERT layout of BERT4Rec, S3-Rec, CL4SRec and ICLRec (post-norm, GELU, width 4d).
- :func:`attention_mask`: causal or bidirectional masks for left-padded item sequences.
- :func:`next_item_loss`: the loss fairness switch, ``"bce"`` (one sampled negative per positive,
  the SASRec/S3-Rec lineage) or ``"ce"`` (softmax cross-entropy over all items, as E4SRec).
- :func:`sample_negatives`: uniform negatives from torch's global generator, vectorised.
- :func:`score_all_items`: the dot product of a user representation with every item embedding.
- :func:`augment_sequences` and :func:`info_nce`: CL4SRec's and ICLRec's crop/mask/reorder views
  and contrastive loss, vectorised over the batch.

Conventions (see :mod:`e4srec.recommender`): item ids 1..n_items, 0 is padding, sequences are
left-padded (the last column is the most recent item).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("bce", "ce")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def check_choice(name: str, value, choices) -> None:
    """A config value outside its choices is an error that names the field."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_fraction(name: str, value: float, low_open: bool = False) -> None:
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Self-attention encoder


def attention_mask(items: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, L, L] boolean mask, True where query i may attend to key j.

    Keys that are padding are hidden; with ``causal`` so are later positions. Every position may
    attend to itself, so a padding query (left padding, or an ICLRec item masked to 0) never has an
    empty row (scaled_dot_product_attention would return NaN); real positions never see padding.
    """
    length = items.shape[1]
    allowed = (items != 0)[:, None, None, :]  # [B, 1, 1, L] keys
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=items.device)


class Dropout(nn.Module):
    """Inverted dropout; on the CPU through a uniform draw, about 3x faster than ``torch.bernoulli``
    (the CPU profile of SASRec was half dropout), on a GPU the fused ``F.dropout``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, training=True)
    return x * ((torch.rand_like(x) >= p).to(x.dtype) * (1.0 / (1.0 - p)))


class MultiHeadSelfAttention(nn.Module):
    """Multi-head attention with a separate query input (SASRec's pre-norm block queries with LN(x))."""

    def __init__(self, hidden_size: int, n_heads: int, attention_dropout: float):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of n_heads {n_heads}")
        self.n_heads, self.attention_dropout = n_heads, attention_dropout
        self.query_proj = nn.Linear(hidden_size, hidden_size)
        self.key_value_proj = nn.Linear(hidden_size, 2 * hidden_size)
        self.output_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = query.shape
        heads = lambda x: x.view(batch, length, self.n_heads, hidden // self.n_heads).transpose(1, 2)  # noqa: E731
        q = heads(self.query_proj(query))  # [B, h, L, d/h]
        k, v = (heads(x) for x in self.key_value_proj(context).chunk(2, dim=-1))
        p = self.attention_dropout if self.training else 0.0
        if p and q.device.type == "cpu":  # the math path, with the faster CPU dropout
            weights = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [B, h, L, L]
            weights = weights.masked_fill(~mask, float("-inf")).softmax(-1)
            out = dropout(weights, p, True) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, h, L, d/h]
        return self.output_proj(out.transpose(1, 2).reshape(batch, length, hidden))  # [B, L, d]


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear -> activation (-> dropout) -> Linear -> dropout."""

    def __init__(self, hidden_size: int, inner_size: int, dropout: float, activation: str, inner_dropout: bool):
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        self.activation = ACTIVATIONS[activation]
        self.up_proj = nn.Linear(hidden_size, inner_size)
        self.down_proj = nn.Linear(inner_size, hidden_size)
        self.inner_dropout = Dropout(dropout if inner_dropout else 0.0)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.inner_dropout(self.activation(self.up_proj(x)))))


class TransformerBlock(nn.Module):
    """One self-attention block, pre-norm (SASRec's code) or post-norm (BERT)."""

    def __init__(self, hidden_size: int, n_heads: int, inner_size: int, dropout: float, attention_dropout: float,
                 activation: str, norm_first: bool, layer_norm_eps: float):
        super().__init__()
        self.norm_first = norm_first
        self.attention = MultiHeadSelfAttention(hidden_size, n_heads, attention_dropout)
        self.attention_dropout = Dropout(0.0 if norm_first else dropout)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.feed_forward = FeedForward(hidden_size, inner_size, dropout, activation, inner_dropout=norm_first)
        self.feed_forward_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, L, d]
        if self.norm_first:  # SASRec: Q = LN(x); x = Q + Attn(Q, x); x = LN(x); x = x + FFN(x)
            query = self.attention_norm(x)
            x = self.feed_forward_norm(query + self.attention(query, x, mask))
            return x + self.feed_forward(x)
        x = self.attention_norm(x + self.attention_dropout(self.attention(x, x, mask)))
        return self.feed_forward_norm(x + self.feed_forward(x))


class SelfAttentiveEncoder(nn.Module):
    """Position embeddings + a stack of :class:`TransformerBlock` over item embeddings.

    ``norm_first=True`` (SASRec): input = item_embeddings * sqrt(d) + positions -> dropout -> blocks
    -> final layer norm. ``norm_first=False`` (BERT layout): input = LN(item_embeddings + positions)
    -> dropout -> blocks. Positions are absolute indices of the left-padded window, so the most
    recent item always sits at position ``max_len - 1`` (as in SASRec's and S3-Rec's code).
    """

    def __init__(self, max_len: int, hidden_size: int, n_layers: int, n_heads: int, inner_size: int,
                 dropout: float, attention_dropout: float, activation: str, norm_first: bool,
                 layer_norm_eps: float = 1e-8):
        super().__init__()
        self.norm_first, self.hidden_size = norm_first, hidden_size
        self.position_embeddings = nn.Embedding(max_len, hidden_size)
        self.input_norm = nn.Identity() if norm_first else nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.input_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, n_heads, inner_size, dropout, attention_dropout, activation, norm_first,
                             layer_norm_eps) for _ in range(n_layers))
        self.output_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if norm_first else nn.Identity()

    def forward(self, item_vectors: torch.Tensor, items: torch.Tensor, causal: bool) -> torch.Tensor:
        """item_vectors [B, L, d] (looked-up embeddings of ``items`` [B, L]) -> hidden states [B, L, d]."""
        length = items.shape[1]
        positions = self.position_embeddings.weight[-length:]  # [L, d]: right-aligned window
        if self.norm_first:
            item_vectors = item_vectors * math.sqrt(self.hidden_size)
        x = self.input_dropout(self.input_norm(item_vectors + positions))
        mask = attention_mask(items, causal)
        for block in self.blocks:
            x = block(x, mask)
        return self.output_norm(x)


WIDTH_BUCKETS = (8, 16, 32)  # trimmed widths for encode_by_width (Beauty: median 4 training items)


def encode_by_width(encode, items: torch.Tensor, widths: tuple[int, ...] | None = None) -> torch.Tensor:
    """``encode`` ([b, w] items -> [b, w, d]) applied to rows grouped by occupied width, each group
    trimmed of its all-padding leading columns; -> [B, L, d], zeros at the trimmed columns.

    With left padding, hidden padding keys and right-aligned positions, trimming leaves every real
    position's output unchanged (tested), while Amazon sequences (mostly < 8 items in a window of
    50) cost about a quarter of the padded computation: SASRec's CPU step went from 100 to 27 ms.
    On a GPU the padded batch is one launch and the grouping (host syncs, 4x the kernels) made steps
    2.5x slower on an H200, so there it runs at full width.
    """
    if items.device.type != "cpu":
        return encode(items)
    widths = WIDTH_BUCKETS if widths is None else widths
    batch, length = items.shape
    first = (items != 0).to(torch.uint8).argmax(1)  # [B] first real column (0 for an empty row)
    occupied = length - first
    out, previous = None, 0
    for width in sorted({w for w in widths if w < length} | {length}):
        rows = torch.nonzero((occupied > previous) & (occupied <= width)).squeeze(1)
        previous = width
        if rows.numel() == 0:
            continue
        hidden = encode(items[rows, length - width:])  # [r, width, d]
        if out is None:
            out = hidden.new_zeros(batch, length, hidden.shape[-1])
        out = out.index_put((rows[:, None], torch.arange(length - width, length, device=items.device)), hidden)
    return out


# ----------------------------------------------------------------------------------------------
# Losses and scoring


def sample_negatives(shape: tuple[int, ...], n_items: int, device, exclude: torch.Tensor | None = None,
                     rounds: int = 3) -> torch.Tensor:
    """Uniform item ids in 1..n_items from torch's global generator, ``shape`` [N, ...].

    ``exclude`` [N, K] (0 entries ignored): an id drawn from a row's excluded items is redrawn, up to
    ``rounds`` times (fixed, so no host-device sync; with K=51 of 12k items a collision survives
    three redraws with probability ~1e-10). The S3-Rec/SASRec samplers also avoid the user's items.
    """
    negatives = torch.randint(1, n_items + 1, shape, device=device)
    if exclude is None:
        return negatives
    flat = negatives.reshape(shape[0], -1)  # [N, M]
    for _ in range(rounds):
        collide = (flat[:, :, None] == exclude[:, None, :]).any(-1)  # [N, M]
        flat = torch.where(collide, torch.randint(1, n_items + 1, flat.shape, device=device), flat)
    return flat.reshape(shape)


CHUNK_BYTES = 3 << 20  # the CPU loss's logits chunk: about 3 MB, cache-sized, reused by the allocator


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of ``hidden @ table.T (+ bias)`` for ``targets``, on the CPU.

    The logits [N, V] are never built whole: rows go through in chunks of about ``CHUNK_BYTES``, and
    each chunk's gradient (softmax - one_hot) is folded at once into the gradients of ``hidden``,
    ``table`` and ``bias``, which the backward pass only scales. Same value and gradients as
    ``F.cross_entropy(hidden @ table.T + bias, targets)`` up to float rounding (tested); on a 2-core
    CPU about 1.6x faster than materialising the logits, whose ~100 MB buffers each step would be
    fresh pages (paper/PERFORMANCE.md, "SASRec against RecBole on the CPU").
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        n, classes = len(targets), table.shape[0]
        chunk = max(8, CHUNK_BYTES // (4 * classes))
        grad_hidden, grad_table = torch.empty_like(hidden), torch.zeros_like(table)
        grad_bias = None if bias is None else torch.zeros_like(bias)
        total = hidden.new_zeros(())
        for start in range(0, n, chunk):
            part, wanted = hidden[start:start + chunk], targets[start:start + chunk]
            rows = torch.arange(len(wanted), device=hidden.device)
            logits = part @ table.T if bias is None else torch.addmm(bias, part, table.T)  # [c, V]
            top, chosen = logits.amax(1), logits[rows, wanted]
            probabilities = torch.softmax(logits, 1)
            # log-sum-exp = top - log(largest probability), which is >= 1/V: it never underflows
            total += (top - probabilities.amax(1).log() - chosen).sum()
            probabilities[rows, wanted] -= 1.0  # d(sum of losses) / d logits
            torch.mm(probabilities, table, out=grad_hidden[start:start + chunk])
            grad_table.addmm_(probabilities.T, part)
            if grad_bias is not None:
                grad_bias += probabilities.sum(0)
        ctx.save_for_backward(grad_hidden, grad_table, grad_bias)
        ctx.count = n
        return total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_hidden, grad_table, grad_bias = ctx.saved_tensors
        scale = grad / ctx.count
        return (grad_hidden * scale, grad_table * scale, None if grad_bias is None else grad_bias * scale, None)


def linear_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ table.T (+ bias)`` over all rows of ``table`` for
    ``targets`` [N] (the fused kernel above when training on the CPU in float32, ``F.cross_entropy``
    otherwise)."""
    fused = (hidden.device.type == "cpu" and torch.is_grad_enabled() and hidden.dtype == table.dtype == torch.float32
             and (hidden.requires_grad or table.requires_grad) and not torch.is_autocast_enabled("cpu"))
    if fused:
        return _LinearCrossEntropy.apply(hidden, table, bias, targets)
    logits = hidden @ table.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits.float(), targets)


def next_item_loss(hidden: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor, loss: str, n_items: int,
                   exclude: torch.Tensor | None = None, item_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-item loss of ``hidden`` [N, d] for ``targets`` [N] (all real items, no padding).

    ``item_table`` [>= n_items + 1, d] scores items by dot product (rows past n_items, e.g. a mask
    token, are never candidates). ``"ce"``: softmax cross-entropy over items 1..n_items. ``"bce"``:
    -log sigmoid(pos) - log(1 - sigmoid(neg)) with one uniform negative per target, avoiding the
    items in ``exclude`` [N, K]. ``item_bias`` [>= n_items + 1] adds a per-item bias (Caser).
    """
    if loss == "ce":  # logits [N, n_items] over items 1..n_items
        bias = None if item_bias is None else item_bias[1:n_items + 1]
        return linear_cross_entropy(hidden, item_table[1:n_items + 1], targets - 1, bias)
    if loss == "bce":
        negatives = sample_negatives(targets.shape, n_items, targets.device, exclude)  # [N]
        pair = torch.stack([targets, negatives], dim=1)  # [N, 2]
        logits = (hidden[:, None, :] * item_table[pair]).sum(-1)  # [N, 2]
        if item_bias is not None:
            logits = logits + item_bias[pair]
        logits = logits.float()
        return (F.softplus(-logits[:, 0]) + F.softplus(logits[:, 1])).mean()
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")


def score_all_items(hidden: torch.Tensor, item_table: torch.Tensor, n_items: int) -> torch.Tensor:
    """[B, d] user representations -> [B, n_items + 1] scores (column 0 is the padding row)."""
    return hidden @ item_table[:n_items + 1].T


def last_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """[B, L, d] -> [B, d]: the state at the most recent item (the last column, left padding)."""
    return hidden[:, -1, :]


def masked_mean(hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """[B, L, d] -> [B, d]: mean over the non-padding positions of ``items`` [B, L]."""
    keep = (items != 0).to(hidden.dtype)[..., None]
    return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# Contrastive learning (CL4SRec, ICLRec)


def _rank_within_rows(keys: torch.Tensor) -> torch.Tensor:
    """Rank (0 = smallest) of every entry of ``keys`` [B, L] within its row."""
    return keys.argsort(dim=1).argsort(dim=1)


def _occupancy(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n [B] items per row, first [B] column of the first item, position [B, L]) of left-padded rows."""
    batch, length = items.shape
    n = (items != 0).sum(1)
    return n, length - n, torch.arange(length, device=items.device).expand(batch, length)


def crop_sequences(items: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep a random contiguous run of max(1, floor(ratio * n)) items of each row, left-padded again."""
    batch, length = items.shape
    n, first, position = _occupancy(items)
    kept = torch.clamp((ratio * n).floor().long(), min=1)
    start = (torch.rand(batch, device=items.device) * (n - kept + 1).clamp(min=1)).floor().long()
    source = first[:, None] + start[:, None] + position - (length - kept)[:, None]
    inside = (position >= (length - kept)[:, None]) & (n > 0)[:, None]
    return torch.where(inside, items.gather(1, source.clamp(0, length - 1)), torch.zeros_like(items))


def mask_sequences(items: torch.Tensor, ratio: float, mask_id: int) -> torch.Tensor:
    """Replace floor(ratio * n) random items of each row by ``mask_id``."""
    n, _, _ = _occupancy(items)
    real = items != 0
    keys = torch.where(real, torch.rand(items.shape, device=items.device), 2.0)  # padding sorts last
    chosen = _rank_within_rows(keys) < (ratio * n).floor().long()[:, None]
    return torch.where(chosen & real, torch.full_like(items, mask_id), items)


def reorder_sequences(items: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shuffle a random contiguous run of floor(ratio * n) items of each row."""
    batch, _ = items.shape
    n, first, position = _occupancy(items)
    window = (ratio * n).floor().long()
    start = first + (torch.rand(batch, device=items.device) * (n - window + 1).clamp(min=1)).floor().long()
    inside = (position >= start[:, None]) & (position < (start + window)[:, None])
    # keys: positions outside the run, random values within (start - 0.5, start + window - 0.5) inside it
    keys = torch.where(inside, start[:, None] - 0.5 + torch.rand(items.shape, device=items.device) * window[:, None],
                       position.to(torch.float))
    return items.gather(1, keys.argsort(dim=1))


def augment_sequences(items: torch.Tensor, mask_id: int, crop_ratio: float, mask_ratio: float,
                      reorder_ratio: float) -> torch.Tensor:
    """One random view of each left-padded sequence ``items`` [B, L]: crop, mask or reorder, chosen
    uniformly per sequence (CL4SRec's three operators; ICLRec's ``random`` augmentation)."""
    choice = torch.randint(0, 3, (items.shape[0], 1), device=items.device)
    return torch.where(choice == 0, crop_sequences(items, crop_ratio),
                       torch.where(choice == 1, mask_sequences(items, mask_ratio, mask_id),
                                   reorder_sequences(items, reorder_ratio)))


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float,
             same_group: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive loss between paired rows of ``first`` and ``second`` [B, D] (dot-product similarity).

    Each row of ``first`` must pick its partner in ``second`` among all rows of ``second`` and the
    other rows of ``first``, and symmetrically (NT-Xent with 2(B-1) in-batch negatives; ICLRec's
    NCELoss). ``same_group`` [B] (optional): rows of the same group are not negatives of each other.
    """
    batch = first.shape[0]
    first, second = first.float(), second.float()
    with torch.autocast(first.device.type, enabled=False):  # fp32: ICLRec's logits reach thousands
        sim_12 = first @ second.T / temperature  # [B, B]
        sim_11 = first @ first.T / temperature
        sim_22 = second @ second.T / temperature
    eye = torch.eye(batch, dtype=torch.bool, device=first.device)
    hide = eye if same_group is None else same_group[:, None] == same_group[None, :]
    sim_11 = sim_11.masked_fill(hide, float("-inf"))
    sim_22 = sim_22.masked_fill(hide, float("-inf"))
    if same_group is not None:
        sim_12 = sim_12.masked_fill(hide & ~eye, float("-inf"))
    logits = torch.cat([torch.cat([sim_12, sim_11], 1), torch.cat([sim_22, sim_12.T], 1)], 0)  # [2B, 2B]
    return F.cross_entropy(logits, torch.arange(2 * batch, device=first.device))  # partner: column i or B + i


def kmeans(points: torch.Tensor, n_clusters: int, iterations: int = 20) -> torch.Tensor:
    """Lloyd's k-means in torch: ``points`` [N, d] -> centroids [n_clusters, d].

    Initial centroids are distinct random points (with replacement only when N < n_clusters), drawn
    from torch's global generator; an empty cluster keeps its previous centroid.
    """
    points = points.float()
    count = points.shape[0]
    if count >= n_clusters:
        start = torch.randperm(count, device=points.device)[:n_clusters]
    else:
        start = torch.randint(0, count, (n_clusters,), device=points.device)
    centroids = points[start].clone()
    for _ in range(iterations):
        assignment = nearest_centroid(points, centroids)  # [N]
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        sizes = torch.bincount(assignment, minlength=n_clusters).to(points.dtype)[:, None]
        centroids = torch.where(sizes > 0, sums / sizes.clamp(min=1.0), centroids)
    return centroids


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N, d], [K, d] -> [N] index of the nearest centroid (squared Euclidean distance)."""
    distances = (centroids * centroids).sum(1)[None, :] - 2 * points.float() @ centroids.T  # + |x|^2, constant
    return distances.argmin(1)

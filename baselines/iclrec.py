"""ICLRec: intent contrastive learning for sequential recommendation.

Paper: Yongjun Chen, Zhiwei Liu, Jia Li, Julian McAuley and Caiming Xiong, "Intent Contrastive
Learning for Sequential Recommendation", WWW 2022. Reference implementation followed: the authors'
code (github.com/salesforce/ICLRec, ``main.py``, ``trainers.py``, ``modules.py``) with its Beauty
script (``scripts/run_beauty.sh``).

A SASRec encoder (the code's post-norm BERT layout: GELU, width 4d, dropout 0.5) is trained on
next-item prediction (binary cross-entropy, one sampled negative per position) plus two
contrastive losses, in an EM loop:
- E-step, before every epoch (``on_epoch_start``): every training sequence is encoded (eval mode),
  its representation is the mean of its hidden states, and k-means (K intents) clusters them;
  intent prototypes are the L2-normalised centroids.
- M-step, every batch: two augmented views of each sequence (crop/mask/reorder drawn uniformly);
  a sequence-level instance loss between the two views (their mean hidden states, see below),
  weight ``instance_cl_weight``; and an intent loss pulling
  each view's mean representation to the prototype of its sequence's intent (the nearest centroid
  of the original sequence's mean representation), weight ``intent_cl_weight``. Both use the code's
  NCE loss (dot products, temperature tau, in-batch negatives; no false-negative removal, the
  script's default).

Defaults (the Beauty script): d=64, 1 layer, 2 heads, dropout 0.5, K=256 intents, crop 0.2, mask 0.7,
reorder 0.2 (the code's tao, gamma, beta; masked items become padding 0, as in the code), tau=1,
instance weight 0.1, intent weight 0.1, no warm-up, lr 1e-3, batch 256, loss "bce".

Deliberate deviations:
- k-means is Lloyd's algorithm in torch (20 iterations, random distinct points as initial
  centroids, an empty cluster keeps its centroid), not faiss (5 restarts, empty-cluster splitting);
  assignment is to the nearest raw centroid as faiss's index does.
- The instance loss compares mean representations (``instance_representation="mean"``, the
  code's ``--seq_representation_instancecl_type mean``), not the code's default concatenation of
  all max_len states ("concatenate", kept as an option, zero at padding positions). With the
  concatenation, whose dot products reach thousands at temperature 1, the next-item task stalled:
  on Beauty (H200, bf16) validation NDCG@10 stayed at 0.009 for 47 epochs (best epoch 6), also
  with the contrastive logits in fp32, while with means it rose steadily (0.027 at epoch 45).
- Mean representations average the non-padding positions only (the code averages all max_len
  positions, padding included, which shrinks short sequences towards the padding state).
- The code's early stopping is on NDCG@20 with patience 40; the suite's trainer uses NDCG@10 (with
  patience 40 and at most 300 epochs, the code's, in ``TRAIN_DEFAULTS``).
"""
from __future__ import annotations

import dataclasses

import torch

from e4srec.data import SequenceData

from .common import augment_sequences, check_choice, check_fraction, info_nce, kmeans, masked_mean, nearest_centroid
from .sasrec import SASRec, SASRecConfig

# Patience 40 as the code's EarlyStopping: with binary cross-entropy and the contrastive losses the
# validation NDCG@10 stays flat for more than 10 epochs before it rises (seen on Beauty).
TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 256, "weight_decay": 0.0, "epochs": 300, "patience": 40}


@dataclasses.dataclass
class ICLRecConfig(SASRecConfig):
    n_layers: int = 1  # the Beauty script's --num_hidden_layers 1
    n_heads: int = 2
    inner_size: int = 256
    activation: str = "gelu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-12
    crop_ratio: float = 0.2  # tao
    mask_ratio: float = 0.7  # gamma
    reorder_ratio: float = 0.2  # beta
    n_intents: int = 256  # K
    kmeans_iterations: int = 20
    intent_warmup_epochs: int = 0  # epochs with the instance loss only
    instance_cl_weight: float = 0.1
    intent_cl_weight: float = 0.1
    temperature: float = 1.0
    instance_representation: str = "mean"  # mean | concatenate (the code's default; see the docstring)

    def __post_init__(self):
        super().__post_init__()
        check_choice("instance_representation", self.instance_representation, ("mean", "concatenate"))
        check_fraction("crop_ratio", self.crop_ratio, low_open=True)
        check_fraction("mask_ratio", self.mask_ratio)
        check_fraction("reorder_ratio", self.reorder_ratio)
        if self.n_intents < 1 or self.kmeans_iterations < 1 or self.intent_warmup_epochs < 0:
            raise ValueError("n_intents and kmeans_iterations must be >= 1, intent_warmup_epochs >= 0")
        if self.temperature <= 0 or self.instance_cl_weight < 0 or self.intent_cl_weight < 0:
            raise ValueError("temperature must be > 0 and the loss weights >= 0")


class ICLRec(SASRec):
    config_class = ICLRecConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: ICLRecConfig | None = None):
        super().__init__(n_items, n_users, max_len, config)
        # Intent centroids [K, d] (raw, for assignment) of the current epoch: recomputed every epoch,
        # so not persistent (not in checkpoints). ``intents_ready`` is False until the first E-step.
        self.register_buffer("intent_centroids", torch.zeros(self.config.n_intents, self.config.hidden_size),
                             persistent=False)
        self.intents_ready = False

    def augment(self, items: torch.Tensor) -> torch.Tensor:
        c = self.config
        return augment_sequences(items, 0, c.crop_ratio, c.mask_ratio, c.reorder_ratio)  # mask -> padding

    @torch.no_grad()
    def on_epoch_start(self, data: SequenceData, epoch: int) -> None:
        """E-step: cluster the mean representations of all training sequences into K intents."""
        self.intents_ready = False
        if epoch < self.config.intent_warmup_epochs or not self.config.intent_cl_weight:
            return
        device = self.item_embeddings.weight.device
        inputs = torch.from_numpy(data.training_sequences()[:, :-1])
        inputs = inputs[(inputs != 0).any(1)]
        was_training = self.training
        self.eval()
        representations = torch.cat([masked_mean(self.encode(part.to(device)), part.to(device))
                                      for part in inputs.split(1024)])  # [U, d]
        self.train(was_training)
        self.intent_centroids.copy_(kmeans(representations, self.config.n_intents, self.config.kmeans_iterations))
        self.intents_ready = True

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        sequence = batch["sequence"]  # [B, L + 1]
        inputs = sequence[:, :-1]
        hidden = self.encode(inputs)  # [B, L, d]
        loss = self.sequence_loss(hidden, sequence)
        if not (c.instance_cl_weight or (c.intent_cl_weight and self.intents_ready)):
            return loss
        first_items, second_items = self.augment(inputs), self.augment(inputs)
        views = self.encode(torch.cat([first_items, second_items]))  # [2B, L, d]
        first, second = views.chunk(2)
        if c.instance_cl_weight:
            if c.instance_representation == "mean":
                first_view, second_view = masked_mean(first, first_items), masked_mean(second, second_items)
            else:  # all positions' states, zero at padding (as the CPU's trimmed columns are)
                first_view = (first * (first_items != 0)[..., None]).flatten(1)
                second_view = (second * (second_items != 0)[..., None]).flatten(1)
            loss = loss + c.instance_cl_weight * info_nce(first_view, second_view, c.temperature)
        if c.intent_cl_weight and self.intents_ready:
            intent_id = nearest_centroid(masked_mean(hidden.detach(), inputs), self.intent_centroids)  # [B]
            intent = torch.nn.functional.normalize(self.intent_centroids[intent_id], dim=-1)  # [B, d]
            intent_loss = (info_nce(masked_mean(first, first_items), intent, c.temperature)
                           + info_nce(masked_mean(second, second_items), intent, c.temperature)) / 2
            loss = loss + c.intent_cl_weight * intent_loss
        return loss

"""Benchmarks of the suite's hot paths: collation, metrics and ranking, SASRec and E4SRec steps.

Run for timings::

    python -m pytest tests/benchmarks --benchmark-enable --benchmark-json=/tmp/bench.json -q

Under the project's default ``--benchmark-disable`` (CI) every benchmark runs its timed call once
and checks its result, so the folder is an ordinary, fast test module. Every input is synthetic and
seeded, built outside the timed call. Sequence lengths follow Beauty's (5 + a Lomax tail: median 6,
mean 8.7, 99th percentile 42 interactions per user; Beauty: 6, 8.9, 43), so SASRec's
trimmed-width encoding and E4SRec's per-batch padding see realistic batches. The recorded numbers
and the machine are in ``paper/PERFORMANCE.md`` ("Hot-path benchmarks on the CPU"; how to run them:
``README.md`` next to this file); ``workflow/scripts/gpu_benchmark.py`` is
the GPU counterpart (tested here only for ``--help`` and its refusal without a GPU).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.sasrec import SASRec, SASRecConfig
from e4srec.data import SequenceData, draw_negatives
from e4srec.evaluate import ranks_from_scores
from e4srec.metrics import HR_KS, NDCG_KS, all_metrics
from e4srec.model import E4SRec, E4SRecConfig
from e4srec.trainer import training_batches
from tiny_llm import write_tiny_backbone

BEAUTY_ITEMS = 12_101  # items of Beauty (Table 2)
MAX_LEN = 50
SCRIPT = Path(__file__).resolve().parents[2] / "workflow" / "scripts" / "gpu_benchmark.py"
# torch intra-op threads while benchmarking: 1 by default. On the shared 2-core machine, 2 threads
# oversubscribe the cores whenever another job runs, and a SASRec step then takes 0.3-4 s instead of
# 0.03-0.4 s (the CLI's --threads exists for the same reason).
THREADS = int(os.environ.get("E4SREC_BENCH_THREADS", "1"))


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(previous)


def beauty_like_lengths(n: int, rng: np.random.Generator, cap: int = 200) -> np.ndarray:
    """Interactions per user: at least 5 (the 5-core filter) plus a Lomax tail fitted to Beauty."""
    return np.minimum(5 + np.floor(rng.pareto(2.0, size=n) * 4.3).astype(np.int64), cap)


def synthetic_data(n_users: int, n_items: int, seed: int, n_negatives: int = 0) -> SequenceData:
    """An in-memory dataset of Beauty-like sequences (item repeats allowed, as in Yelp)."""
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, n_items + 1, size=int(length)) for length in beauty_like_lengths(n_users, rng)]
    if n_negatives:
        by_user = {u + 1: seq.tolist() for u, seq in enumerate(sequences)}
        negatives = np.asarray([row for _, row in sorted(draw_negatives(by_user, n_items, n_negatives, seed).items())])
    else:
        negatives = np.zeros((n_users, 0), dtype=np.int64)
    return SequenceData(name="synthetic", n_items=n_items, max_len=MAX_LEN,
                        user_ids=np.arange(1, n_users + 1), sequences=sequences, negatives=negatives,
                        record={"name": "synthetic", "n_items": n_items, "max_len": MAX_LEN})


def reference_pad(items, width: int) -> tuple[int, ...]:
    """The last ``width`` items right-aligned after zeros, written out plainly (no numpy slicing tricks)."""
    items = [int(i) for i in items][-width:] if width else []
    return tuple([0] * (width - len(items)) + items)


def concatenate(batches: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    return {key: torch.cat([b[key] for b in batches]).numpy() for key in batches[0]}


# ----------------------------------------------------------------------------------------------
# Collation: one epoch of training batches


@pytest.fixture(scope="module")
def collation_data() -> SequenceData:
    return synthetic_data(2_000, BEAUTY_ITEMS, seed=1)


@pytest.mark.benchmark(group="collation")
def test_collate_sequences_epoch(benchmark, collation_data):
    """SASRec's epoch of [256, 51] sequence batches (the batches of every 'sequences' model)."""
    data = collation_data
    model = types.SimpleNamespace(training_input="sequences", trim_batch=lambda batch: batch)  # as Recommender

    def epoch():
        n_batches, batches = training_batches(model, data, 256, seed=0, epoch=3, device="cpu")
        return n_batches, list(batches)

    n_batches, batches = benchmark(epoch)
    assert n_batches == len(batches) == math.ceil(data.n_users / 256)
    assert all(len(b["user"]) <= 256 and b["sequence"].shape[1] == MAX_LEN + 1 for b in batches)
    rows = concatenate(batches)
    assert sorted(rows["user"].tolist()) == list(range(data.n_users))  # every user once (all have >= 3 training items)
    for user, sequence in zip(rows["user"], rows["sequence"]):
        assert tuple(sequence.tolist()) == reference_pad(data.sequences[user][:-2], MAX_LEN + 1)


@pytest.mark.benchmark(group="collation")
def test_collate_examples_epoch(benchmark, collation_data):
    """E4SRec's epoch of batch-16 examples (history [16, 50], target [16]): one per training position."""
    data = collation_data
    model = types.SimpleNamespace(training_input="examples", trim_batch=lambda batch: batch)  # as Recommender

    def epoch():
        n_batches, batches = training_batches(model, data, 16, seed=0, epoch=3, device="cpu")
        return n_batches, list(batches)

    n_batches, batches = benchmark(epoch)
    expected = []
    for user, sequence in enumerate(data.sequences):
        train = sequence[:-2]
        for t in range(1, len(train)):
            if len(train) - t <= MAX_LEN:  # the last max_len positions of the training part
                expected.append((user, reference_pad(train[:t], MAX_LEN), int(train[t])))
    rows = concatenate(batches)
    got = [(int(u), tuple(h.tolist()), int(t)) for u, h, t in zip(rows["user"], rows["history"], rows["target"])]
    assert n_batches == len(batches) == math.ceil(len(expected) / 16)
    assert sorted(got) == sorted(expected)
    assert got != sorted(got)  # shuffled


# ----------------------------------------------------------------------------------------------
# Metrics and ranks


@pytest.mark.benchmark(group="metrics")
def test_all_metrics_100k(benchmark):
    rng = np.random.default_rng(2)
    ranks = np.where(rng.random(100_000) < 0.2, rng.integers(1, 21, 100_000),
                     rng.integers(1, BEAUTY_ITEMS + 1, 100_000)).astype(np.int32)
    rows = benchmark(all_metrics, ranks)
    values = {(metric, k): value for metric, k, value in rows}
    assert list(values) == [("HR", k) for k in HR_KS] + [("NDCG", k) for k in NDCG_KS] + [("MRR", None)]
    plain = ranks.tolist()
    for k in HR_KS:
        assert values["HR", k] == sum(r <= k for r in plain) / len(plain)
    for k in NDCG_KS:
        assert values["NDCG", k] == pytest.approx(math.fsum(1 / math.log2(r + 1) for r in plain if r <= k) / len(plain),
                                                  rel=1e-12)
    assert values["MRR", None] == pytest.approx(math.fsum(1 / r for r in plain) / len(plain), rel=1e-12)


@pytest.mark.benchmark(group="metrics")
def test_ranks_from_scores_512(benchmark):
    """Three protocols for 512 users over Beauty's 12,101 items: history masking, 99 negatives."""
    data = synthetic_data(512, BEAUTY_ITEMS, seed=3, n_negatives=99)
    for user in range(0, 512, 16):  # repeat consumption: the target is an item of the history
        data.sequences[user][-1] = data.sequences[user][0]
    histories = data.histories("test")  # uncut, as rank_split passes them
    targets = data.targets("test")
    generator = torch.Generator().manual_seed(3)
    # quantised scores: ties occur (pessimistic counting is checked), as they do for bf16 models
    scores = torch.round(torch.randn(512, BEAUTY_ITEMS + 1, generator=generator) * 256) / 256
    target_t, negatives_t = torch.from_numpy(targets), torch.from_numpy(data.negatives)

    ranks = benchmark(ranks_from_scores, scores, target_t, negatives_t, histories)

    s = scores.double().numpy()
    rows = np.arange(512)
    target_scores = s[rows, targets]
    full = (s[:, 1:] >= target_scores[:, None]).sum(1)
    masked_s = s.copy()
    for row, history in enumerate(histories):
        masked_s[row, history] = -np.inf
    masked_target = masked_s[rows, targets]
    masked = np.where(np.isinf(masked_target), BEAUTY_ITEMS, (masked_s[:, 1:] >= masked_target[:, None]).sum(1))
    sampled = 1 + (np.take_along_axis(s, data.negatives, 1) >= target_scores[:, None]).sum(1)
    assert set(ranks) == {"full", "full_masked", "sampled"}
    np.testing.assert_array_equal(ranks["full"], full)
    np.testing.assert_array_equal(ranks["full_masked"], masked)
    np.testing.assert_array_equal(ranks["sampled"], sampled)
    assert (ranks["full_masked"] == BEAUTY_ITEMS).any()  # some targets repeat a history item
    assert ((s[:, 1:] == target_scores[:, None]).sum(1) > 1).any()  # some targets tie with other items


# ----------------------------------------------------------------------------------------------
# SASRec: one training step at batch 256 on Beauty's item count


@pytest.mark.benchmark(group="sasrec-step")
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_sasrec_training_step(benchmark, loss):
    data = synthetic_data(256, BEAUTY_ITEMS, seed=4)
    batch = {"user": torch.arange(256), "sequence": torch.from_numpy(data.training_sequences())}  # [256, 51]
    torch.manual_seed(0)
    model = SASRec(BEAUTY_ITEMS, 22_363, MAX_LEN, SASRecConfig(loss=loss))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def step():
        loss_value = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        optimizer.step()
        return loss_value.detach()

    value = benchmark(step)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    # one sampled negative: about 2 log 2 at the start; CE over all items: about log(12,101)
    assert float(value) < (3.0 if loss == "bce" else 2 * math.log(BEAUTY_ITEMS))
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
        assert not torch.equal(parameter, before[name]), f"{name} did not move"


# ----------------------------------------------------------------------------------------------
# E4SRec on the tiny random LLaMA (hidden 32, 2 layers)

E4SREC_ITEMS = 300


@pytest.fixture(scope="module")
def tiny_e4srec(tmp_path_factory):
    backbone_dir = write_tiny_backbone(tmp_path_factory.mktemp("bench") / "backbone")
    generator = torch.Generator().manual_seed(5)
    table = torch.randn(E4SREC_ITEMS + 1, 64, generator=generator)
    table[0] = 0
    data = synthetic_data(256, E4SREC_ITEMS, seed=5)

    def build() -> E4SRec:
        torch.manual_seed(0)
        model = E4SRec(E4SREC_ITEMS, data.n_users, MAX_LEN, E4SRecConfig(), backbone_dir=backbone_dir,
                       item_embeddings=table)
        with torch.no_grad():  # LoRA B starts at zero: give the adapters a visible effect
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.3)
        return model

    return build, data


@pytest.mark.benchmark(group="e4srec")
def test_e4srec_training_step(benchmark, tiny_e4srec):
    """Batch 16 (the paper's), histories padded to 50 as the trainer sends them; CPU eager path."""
    build, data = tiny_e4srec
    model = build()
    model.train()
    users, histories, targets = data.training_examples()
    pick = np.random.default_rng(6).choice(len(users), size=16, replace=False)
    batch = {"user": torch.from_numpy(users[pick]), "history": torch.from_numpy(histories[pick]),
             "target": torch.from_numpy(targets[pick])}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-4, weight_decay=0.1)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in trainable]

    def step():
        loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    loss = benchmark(step)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 < float(loss) < 3 * math.log(E4SREC_ITEMS)
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))  # LoRA, projection, scorer moved
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.benchmark(group="e4srec")
def test_e4srec_scoring_batch(benchmark, tiny_e4srec):
    """One full-catalogue scoring batch of 256 users (the paper profile's eval batch), shared prefix."""
    build, data = tiny_e4srec
    model = build()
    model.eval()
    history = torch.from_numpy(data.padded_histories("test"))  # [256, 50]

    def score():
        with torch.no_grad():
            return model.full_sort_predict({"user": torch.arange(len(history)), "history": history})

    scores = benchmark(score)
    assert scores.shape == (256, E4SREC_ITEMS + 1) and scores.dtype == torch.float32
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    model.config.share_prefix = "never"  # the reference: the whole prompt for each user alone
    with torch.no_grad():
        for row in range(0, 256, 32):
            one = history[row][history[row] > 0][None]
            torch.testing.assert_close(model.full_sort_predict({"history": one})[0, 1:], scores[row, 1:],
                                       atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The GPU benchmark script, on a machine without a GPU


def test_gpu_benchmark_script_help_and_no_gpu(tmp_path):
    shown = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "--dataset-dir" in shown.stdout and "--backbone" in shown.stdout and "CUDA" in shown.stdout
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever this machine has
    refused = subprocess.run([sys.executable, str(SCRIPT), "--dataset-dir", str(tmp_path), "--out", str(out)],
                             capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 3, refused.stderr
    assert "no CUDA GPU" in refused.stderr and "Traceback" not in refused.stderr
    assert not out.exists()


def test_gpu_benchmark_script_runs_every_part_on_the_cpu(tmp_path):
    """--cpu-smoke-test: every row of the GPU benchmark (both training layouts, the packed epoch, the
    padded and packed scoring with identical ranks, the bare backbone, SASRec) on tiny data; timings mean nothing."""
    import json

    from tiny_llm import write_tiny_dataset

    backbone = write_tiny_backbone(tmp_path / "backbone")
    dataset = write_tiny_dataset(tmp_path / "data" / "tiny", n_items=30)
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke-test", "--dataset-dir", str(dataset),
                           "--backbone", str(backbone), "--out", str(out), "--modes", "eager", "--batch-sizes", "4",
                           "--packed-batch-sizes", "4", "--steps", "2", "--warmup", "1", "--epoch",
                           "--eval-users", "16", "--eval-batch-size", "8", "--eval-settings", "16:64:packed:12",
                           "--eval-float32", "--eval-float64", "--bare-backbone", "--sasrec-losses", "bce"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    whats = [r["what"] for r in rows]
    assert whats == ["E4SRec training step (examples)", "E4SRec training step (packed)",
                     "E4SRec training epoch (packed, length-grouped)",
                     "bare backbone forward (no LoRA, no cache, no scorer)",
                     "E4SRec scoring (rank_split, all items; padded, float32)",
                     "E4SRec scoring (rank_split, all items; packed, float32)",
                     "E4SRec scoring (rank_split, all items; padded, float32)",  # --eval-float32 (a no-op here)
                     "E4SRec scoring (rank_split, all items; packed, float32)",
                     "E4SRec scoring (rank_split, all items; padded, float64)",  # --eval-float64
                     "E4SRec scoring (rank_split, all items; packed, float64)", "SASRec epoch (shared trainer)"]
    assert rows[2]["targets"] > 0 and rows[0]["tokens_per_step"] > rows[0]["targets_per_step"]
    assert rows[3]["users"] == 24 and rows[3]["users_per_second"] > 0  # the bare backbone: every user
    # packed = padded, in each precision
    assert rows[5]["ranks_identical_to_first"] is rows[7]["ranks_identical_to_first"] is True
    assert rows[9]["ranks_identical_to_first"] is True
    assert rows[5]["row_tokens"] == 12 and rows[4]["row_tokens"] is None
    assert rows[5]["valid_ndcg10"] == rows[4]["valid_ndcg10"] and 0 <= rows[4]["valid_hr10"] <= 1
    assert "| E4SRec training step (packed) |" in done.stdout


def test_gpu_benchmark_script_scores_trained_components(tmp_path):
    """--components: the benchmark scores a trained run's components (loaded as the service loads them),
    here only in float64 (--skip-model-precision), where packed and padded scoring rank alike."""
    import json

    from e4srec.data import SequenceData
    from e4srec.evaluate import rank_split
    from e4srec.metrics import ndcg
    from e4srec.model import E4SRec
    from tiny_llm import write_item_embeddings, write_tiny_dataset

    backbone = write_tiny_backbone(tmp_path / "backbone")
    dataset = write_tiny_dataset(tmp_path / "data" / "tiny", n_items=30)
    table = write_item_embeddings(tmp_path / "items.safetensors", 30)
    torch.manual_seed(0)
    model = E4SRec(30, 24, 50, backbone_dir=backbone, item_embeddings=table)
    with torch.no_grad():  # a visibly "trained" adapter and scorer
        for name, parameter in model.named_parameters():
            if "lora_B" in name or name.startswith("item_scorer"):
                parameter.normal_(0, 0.3)
    model.save_components(tmp_path / "components", dataset="tiny")
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke-test", "--dataset-dir", str(dataset),
                           "--backbone", str(backbone), "--components", str(tmp_path / "components"),
                           "--out", str(out), "--trainings", "--eval-users", "0", "--eval-batch-size", "8",
                           "--eval-settings", "24:96:packed:12", "--skip-model-precision", "--eval-float64",
                           "--sasrec-losses"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layout"], r["dtype"], r["users"]) for r in rows] == [("padded", "float64", 24), ("packed", "float64", 24)]
    assert rows[1]["ranks_identical_to_first"] is True and rows[1]["valid_ndcg10"] == rows[0]["valid_ndcg10"]
    model = model.eval().double()  # the same weights, scored here: the script used the components
    with torch.no_grad():
        ranks = rank_split(model.full_sort_predict, SequenceData.load(dataset), "valid", 8)["full"]
    assert rows[0]["valid_ndcg10"] == pytest.approx(ndcg(ranks, 10))

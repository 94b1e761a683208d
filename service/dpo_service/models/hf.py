"""Local ``transformers`` causal LMs behind the :class:`~modern_llm.alignment.logprobs.CausalLM`
protocol (``DPO_MODEL=hf:/path/to/dir``).

Needs the optional extra ``pip install 'dpo-loss-service[hf]'``; ``transformers`` is imported
only when an ``hf:`` model is loaded. The directory is one written by ``save_pretrained``:
``config.json``, safetensors weights (``model.safetensors`` or a sharded index) and the
tokenizer files. Nothing is downloaded (``local_files_only=True``), weights load with
``use_safetensors=True`` (pickled ``.bin`` weights are refused) and no remote code runs.

Tokenization of text triples (as TRL's ``DPOTrainer`` does it):

- prompt: ``tokenizer(prompt, add_special_tokens=True)``, i.e. with the tokenizer's BOS when its
  post-processor adds one, kept once (a prompt whose text already starts with BOS does not get
  a second one);
- chosen / rejected: ``tokenizer(response, add_special_tokens=False)`` then the EOS id when the
  tokenizer has one; an empty response stays empty (and is rejected with 422);
- prompt and responses are tokenized separately, so the response mask is exactly the tokens
  produced for the response; pad id: ``pad_token_id``, else ``eos_token_id``, else 0.

Message lists (conversational pairs) are rendered with the tokenizer's chat template as TRL
does: :mod:`dpo_service.models.chat_template`.

Optimisations that apply to HF models: chosen + rejected in one forward pass; the LM head only
on response positions (the adapter returns the decoder's final-normed hidden states and
:func:`~modern_llm.alignment.logprobs.pair_logps` applies ``lm_head`` in chunks); prefix sharing
(``SHARED_PREFIX``) through a 4D attention mask with explicit ``position_ids`` when a load-time
probe shows the architecture honours it exactly, otherwise the bundle says
``supports_custom_mask=False`` and the engine uses ``TWO_ROWS``; the prefix KV cache
(``PREFIX_CACHE``, what ``auto`` runs for loss-only work: the prompts once, causal, their
``transformers`` cache tiled over the chosen and rejected rows) when a second probe shows it
exact (:mod:`dpo_service.models.hf_probes`); Llama-style RMSNorms run as one fused kernel where
that is exact (:mod:`dpo_service.models.hf_speed`). Dropout is disabled, as TRL does.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpo_service.models import hf_speed
from dpo_service.models.bundle import ModelBundle
from dpo_service.models.hf_identity import model_identity, vocab_sha256
from dpo_service.models.hf_probes import (
    MASK_STYLES,
    check_lm_head,
    probe_custom_mask,
    probe_prefix_cache,
)
from dpo_service.models.hf_speed import KVCache
from modern_llm.alignment.logprobs import PairTokens

__all__ = [
    "HFCausalLM",
    "HFTripleTokenizer",
    "check_lm_head",
    "load_hf_bundle",
    "probe_custom_mask",
    "probe_prefix_cache",
]

log = logging.getLogger(__name__)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "hf: models need the optional 'transformers' dependency: "
            "pip install 'dpo-loss-service[hf]'"
        ) from exc
    return transformers


class HFTripleTokenizer:
    """:class:`~dpo_service.models.bundle.TripleTokenizer` over a ``transformers`` tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer
        source = Path(str(getattr(tokenizer, "name_or_path", "") or "")).name
        self.name = f"{type(tokenizer).__name__}:{source}" if source else type(tokenizer).__name__
        self.vocab_size = len(tokenizer)
        self.vocab_sha256 = vocab_sha256(tokenizer)  # checkpoint identity (hf_identity)
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = (
            pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        )

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.inner(text, add_special_tokens=special)["input_ids"])

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self._ids(prompt, special=True)
        if self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]  # the text already began with BOS: keep it once
        return ids

    def encode_response(self, response: str) -> list[int]:
        if not response:
            return []
        ids = self._ids(response, special=False)
        return [*ids, self.eos_id] if self.eos_id is not None else ids

    def encode_triple(self, prompt: str, chosen: str, rejected: str) -> PairTokens:
        return PairTokens(
            prompt=self.encode_prompt(prompt),
            chosen=self.encode_response(chosen),
            rejected=self.encode_response(rejected),
        )


def _decoder_of(model: nn.Module) -> nn.Module:
    """The body that returns final-normed hidden states (``model.model``, ``transformer``...)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    raise ValueError(f"{type(model).__name__}: cannot find the decoder body under the LM head")


class HFCausalLM(nn.Module):
    """Adapts a ``transformers`` ``*ForCausalLM`` to the ``CausalLM`` protocol.

    ``hidden_states`` runs only the decoder body (no LM head) and returns its last hidden state;
    an explicit boolean "may attend" mask ``attn_mask`` (B, T, S) is passed as a (B, 1, T, S)
    4D ``attention_mask`` in ``mask_style``: ``"additive"`` (0 / dtype-min, what recent
    ``transformers`` expects) or ``"bool"``. With ``supports_prefix_cache`` (set by the load-time
    probe, :func:`~dpo_service.models.hf_probes.probe_prefix_cache`) it also keeps and reuses a
    KV cache, as the built-in model does for ``PREFIX_CACHE``.
    """

    def __init__(self, model: nn.Module, *, mask_style: str = "additive") -> None:
        super().__init__()
        if mask_style not in MASK_STYLES:
            raise ValueError(f"mask_style must be one of {MASK_STYLES}, got {mask_style!r}")
        self.model = model  # the only registered submodule: state_dict keys are "model.*"
        self.mask_style = mask_style
        self.supports_prefix_cache = False  # until probe_prefix_cache says otherwise
        self.stock_modules: dict[str, nn.Module] = {}  # what fuse_modules replaced
        decoder = _decoder_of(model)  # fail early
        # transformers 5 renamed the decoder's ``past_key_values`` argument to ``cache``.
        params = inspect.signature(decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def fuse_modules(self) -> int:
        """Swap in the fused modules of :mod:`~dpo_service.models.hf_speed` where they compute
        exactly what the originals do; returns how many were replaced."""
        self.stock_modules.update(hf_speed.fuse_rms_norms(self.model))
        return len(self.stock_modules)

    def use_stock_paths(self) -> None:
        """Back to the stock paths: ``transformers``' own modules and no prefix KV cache (what
        the adapter ran before its speed paths; for side-by-side measurements)."""
        hf_speed.restore_modules(self.model, self.stock_modules)
        self.stock_modules = {}
        self.supports_prefix_cache = False

    @property
    def lm_head(self) -> nn.Module:
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), Tensor):
            raise ValueError(f"{type(self.model).__name__} has no linear output embedding")
        return head

    @property
    def lm_head_weight(self) -> Tensor:
        weight: Tensor = self.lm_head.weight  # type: ignore[assignment]
        return weight

    @property
    def lm_head_bias(self) -> Tensor | None:
        bias = getattr(self.lm_head, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    def _mask_4d(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        allowed = allowed if allowed.dim() == 4 else allowed[:, None]  # (B, 1, T, S)
        if self.mask_style == "bool":
            return allowed
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)

    def _mask_dtype(self, device: torch.device) -> torch.dtype:
        """The additive mask's dtype: the autocast dtype when autocast is on (what attention
        runs in, so no layer converts the mask again), else the weights' (float32 if not float)."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        dtype = self.lm_head_weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> Any:
        """Final-normed hidden states (B, T, D) of the decoder body, plus the new KV cache (one
        ``(key, value)`` pair per layer) when ``use_cache``.

        ``attention_mask`` is a (B, S) 1/0 padding mask; ``attn_mask`` an explicit boolean
        (B, T, S) or (B, 1, T, S) "may attend" mask replacing the causal one (combined with the
        padding mask when both are given). ``past_key_values``: a cache from an earlier call;
        one of batch B' dividing B is tiled (input row i continues cache row i mod B', e.g. one
        cached prompt shared by its chosen and its rejected row). Caches need
        ``supports_prefix_cache``.
        """
        if (past_key_values is not None or use_cache) and not self.supports_prefix_cache:
            raise NotImplementedError("KV caches are not supported for this model")
        mask: Tensor | None = attention_mask
        if attn_mask is not None:
            allowed = attn_mask.bool()
            if attention_mask is not None:
                keys = attention_mask.bool()[:, None, :]  # (B, 1, S)
                allowed = allowed & (keys if allowed.dim() == 3 else keys[:, None])
            mask = self._mask_4d(allowed, self._mask_dtype(input_ids.device))
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": use_cache}
        if mask is not None:
            kwargs["attention_mask"] = mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if past_key_values is not None:
            kwargs[self._cache_arg] = hf_speed.tiled_cache(past_key_values, input_ids.shape[0])
        out = _decoder_of(self.model)(**kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = hidden if isinstance(hidden, Tensor) else out[0]
        if not use_cache:
            return hidden
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return hidden, hf_speed.kv_pairs(cache)

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        """Full logits (B, T, V) from the wrapped model (for checks; the service never calls it)."""
        logits: Tensor = self.model(input_ids=input_ids, use_cache=False, **kwargs).logits
        return logits


# ------------------------------------------------------------------------------ loading


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"hf model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"hf model directory {path} has no config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        raise FileNotFoundError(
            f"hf model directory {path} has no *.safetensors weights "
            "(pickled .bin weights are not loaded)"
        )


def _max_seq_len(config: Any, tokenizer: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10_000_000:
        return value
    raise ValueError("cannot tell the maximum sequence length from config.json or the tokenizer")


def _dtype_kwargs(transformers: Any, dtype: torch.dtype) -> dict[str, Any]:
    from packaging.version import Version

    newer = Version(transformers.__version__) >= Version("4.56")
    return {"dtype": dtype} if newer else {"torch_dtype": dtype}


def load_hf_bundle(path: Path | str, *, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """Load a local ``transformers`` causal LM and its tokenizer from ``path``, its weights
    in ``dtype`` (the service passes float32: the master weights its optimizer updates; the
    compute dtype is applied by autocast, not by the stored weights).

    Raises ``FileNotFoundError`` for a missing directory or files and ``ValueError`` for a
    directory that ``transformers`` cannot load or an unsupported architecture.
    """
    path = Path(path).expanduser()
    _check_dir(path)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, **_dtype_kwargs(transformers, dtype)
        )
    except Exception as exc:
        raise ValueError(
            f"hf model directory {path} could not be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    # dtype was applied by from_pretrained, which keeps fp32 buffers (RoPE inv_freq) and
    # ``_keep_in_fp32_modules`` as the architecture wants; a blanket .to(dtype) would not.
    model.to(device=device)
    for module in model.modules():  # as TRL's disable_dropout_in_model
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.eval()
    adapter = HFCausalLM(model)
    fused = adapter.fuse_modules()
    check_lm_head(adapter)
    style = probe_custom_mask(adapter)
    cached = style is not None and probe_prefix_cache(adapter)  # it needs the 4D mask too
    adapter.eval()
    tok = HFTripleTokenizer(tokenizer)
    vocab = int(adapter.lm_head_weight.shape[0])
    if tok.vocab_size > vocab:
        log.warning("tokenizer has %d tokens but the model only %d rows", tok.vocab_size, vocab)
    log.info(
        "loaded hf model %s (%s), prefix sharing: %s, prefix KV cache: %s, fused norms: %d",
        path.name,
        type(model).__name__,
        f"4D {style} mask" if style else "off (two rows)",
        "on" if cached else "off",
        fused,
    )
    return ModelBundle(
        model=adapter,
        tokenizer=tok,
        name=path.name,
        kind="hf",
        vocab_size=vocab,
        max_seq_len=_max_seq_len(config, tokenizer),
        supports_custom_mask=style is not None,
        identity=model_identity(config, adapter),
    )

"""ALiBi decoder-only LM: the default frozen backbone (stage 1).

Stock ``fairseq-train --task language_modeling --arch alibi_lm_*`` pretrains it.
It is fairseq's ``transformer_lm`` with no position embeddings and an ALiBi
bias in every self-attention, so its keys and values carry no absolute
position and memory is searched by content (as in the original LongMem
backbone). The layers are fairseq's ``TransformerDecoderLayer``; the forward
is :func:`fairseq_longmem.modules.decoder_layer.decoder_forward`, shared with
the side network.
"""

from __future__ import annotations

import logging
from typing import Dict

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerDecoder
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)
from fairseq.utils import safe_getattr
from torch import Tensor

from ..modules.decoder_layer import alibi_bias, alibi_slopes, decoder_forward
from ..modules.incremental import SegmentDecoding, decoder_step

logger = logging.getLogger(__name__)


class AlibiTransformerDecoder(SegmentDecoding, TransformerDecoder):
    """``TransformerDecoder`` without position embeddings, with ALiBi biases.

    Incremental decoding (fairseq's generators) follows segment semantics
    (:mod:`..modules.incremental`): the history is cut into segments of
    ``max_target_positions`` tokens and a token sees its own segment only,
    exactly as ``fairseq-eval-lm`` on the stream task scores it.
    """

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=True):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        self.embed_positions = None
        self.register_buffer(
            "alibi_slopes", alibi_slopes(self.layers[0].self_attn.num_heads), persistent=False
        )
        self._bias_cache: Dict[tuple, Tensor] = {}

    def attn_bias(self, tgt_len: int, device) -> Tensor:
        """Cached causal ALiBi bias ``(1, heads, tgt_len, tgt_len)`` in fp32."""
        key = (tgt_len, str(device))
        if key not in self._bias_cache:
            self._bias_cache = {key: alibi_bias(self.alibi_slopes.float(), tgt_len, device)}
        return self._bias_cache[key]

    def extract_features(
        self,
        prev_output_tokens,
        encoder_out=None,
        incremental_state=None,
        full_context_alignment=False,
        alignment_layer=None,
        alignment_heads=None,
    ):
        if incremental_state is not None:
            x = self.incremental_features(prev_output_tokens, incremental_state)
            return x, {"attn": [None], "inner_states": None}
        hiddens, x, _ = decoder_forward(self, prev_output_tokens)
        return x, {"attn": [None], "inner_states": hiddens}

    def max_positions(self):
        return self.max_target_positions

    def segment_length(self) -> int:
        return int(self.max_target_positions)

    def segment_stacks(self):
        return {"layers": len(self.layers)}

    def segment_step(self, tokens, state, query_mask):
        return decoder_step(self, tokens, state.pos, state.caches["layers"])[1]


@register_model("alibi_lm", dataclass=TransformerLanguageModelConfig)
class AlibiLanguageModel(TransformerLanguageModel):
    """Decoder-only LM with ALiBi attention biases instead of position embeddings."""

    @classmethod
    def build_model(cls, args, task):
        alibi_lm_base(args)
        if safe_getattr(args, "character_embeddings", False) or safe_getattr(
            args, "adaptive_input", False
        ):
            raise ValueError(
                "alibi_lm supports plain token embeddings only: drop "
                "--character-embeddings/--adaptive-input"
            )
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", 1024)
        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        decoder = AlibiTransformerDecoder(
            args, task.target_dictionary, embed_tokens, no_encoder_attn=True
        )
        return cls(decoder)


def alibi_lm_base(args) -> None:
    """Defaults of the ALiBi LM: pre-norm, GELU, tied input/output embeddings."""
    args.decoder_normalize_before = safe_getattr(args, "decoder_normalize_before", True)
    args.activation_fn = safe_getattr(args, "activation_fn", "gelu")
    args.share_decoder_input_output_embed = safe_getattr(
        args, "share_decoder_input_output_embed", True
    )
    args.no_token_positional_embeddings = True
    base_lm_architecture(args)


def _preset(args, layers: int, dim: int, heads: int, ffn: int) -> None:
    args.decoder_layers = safe_getattr(args, "decoder_layers", layers)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", dim)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", ffn)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", heads)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)
    alibi_lm_base(args)


@register_model_architecture("alibi_lm", "alibi_lm_tiny")
def alibi_lm_tiny(args):
    """Tests: 4 layers, d=64, 4 heads (seconds on a CPU)."""
    _preset(args, layers=4, dim=64, heads=4, ffn=256)


@register_model_architecture("alibi_lm", "alibi_lm_small")
def alibi_lm_small(args):
    """CPU quickstart: 4 layers, d=256, 8 heads."""
    _preset(args, layers=4, dim=256, heads=8, ffn=1024)


@register_model_architecture("alibi_lm", "alibi_lm_gpt2_small")
def alibi_lm_gpt2_small(args):
    """12 layers, d=768, 12 heads."""
    _preset(args, layers=12, dim=768, heads=12, ffn=3072)


@register_model_architecture("alibi_lm", "alibi_lm_gpt2_medium")
def alibi_lm_gpt2_medium(args):
    """The paper's backbone shape: 24 layers, d=1024, 16 heads."""
    _preset(args, layers=24, dim=1024, heads=16, ffn=4096)

"""Tiny random-weight Hugging Face models built from configs (no downloads), with example inputs and the
number of attention sites each must have, plus an SFA attention function for reference runs."""

import copy
import inspect

import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from sfa_compile import flash_sfa

REFERENCE_TOPK = {"value": None}


def sfa_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                            **kwargs):
    """Hugging Face attention function computing every attention with sfa_compile.flash_sfa (as SDPA would)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(is_causal and attention_mask is None and query.shape[2] > 1)
    position_bias = kwargs.get("position_bias")  # T5's relative position bias, added to the scores
    if position_bias is not None:
        if is_causal:  # the mask function left causality to is_causal: written out, as the bias needs a mask
            causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
            position_bias = position_bias.masked_fill(~causal, float("-inf"))
            is_causal = False
        attention_mask = position_bias if attention_mask is None else position_bias + attention_mask
    out = flash_sfa(query, key, value, topk=REFERENCE_TOPK["value"], attn_mask=attention_mask, scale=scaling,
                    is_causal=is_causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sfa_reference", sfa_reference_attention)
AttentionMaskInterface.register("sfa_reference", sdpa_mask)


def cache_kwarg(model, cache) -> dict:
    """``cache`` as the keyword argument ``model``'s forward and generate take: ``cache`` from transformers 5.24
    on (``past_key_values`` is deprecated there, to be removed from forward in 5.40), ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _ids(n=2, length=9, vocab=100, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def build(name: str, impl: str):
    """(model as constructed, in training mode, example kwargs, attention sites, head dim)."""
    torch.manual_seed(0)
    small = dict(vocab_size=100, attn_implementation=impl)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **small)
        return transformers.GPT2LMHeadModel(cfg), {"input_ids": _ids()}, 2, 16
    if name in ("llama", "qwen3", "mistral"):
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[name]
        cfg = cls[0](num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, head_dim=16, **small)
        return cls[1](cfg), {"input_ids": _ids()}, 2, 16
    if name == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, **small)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # padding
        return transformers.BertModel(cfg), {"input_ids": _ids(), "attention_mask": mask}, 2, 16
    if name == "vit":
        cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8, attn_implementation=impl)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return transformers.ViTModel(cfg), {"pixel_values": pixels}, 2, 16
    if name == "whisper":
        cfg = transformers.WhisperConfig(encoder_layers=1, decoder_layers=1, d_model=32, encoder_attention_heads=2,
                                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                         num_mel_bins=8, max_source_positions=16, max_target_positions=32,
                                         vocab_size=100, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                         decoder_start_token_id=3, attn_implementation=impl)
        feats = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
        return (transformers.WhisperModel(cfg), {"input_features": feats, "decoder_input_ids": _ids(1, 5)},
                3, 16)
    seq2seq = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                   eos_token_id=2, decoder_start_token_id=2, **small)
    if name == "t5":  # no scaling, relative position bias added to the scores
        cfg = transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                                    decoder_start_token_id=0, pad_token_id=0, **small)
        return transformers.T5Model(cfg), {"input_ids": _ids(), "decoder_input_ids": _ids(2, 5, seed=1)}, 3, 16
    if name in ("bart", "marian", "mbart"):
        cls = {"bart": (transformers.BartConfig, transformers.BartModel),
               "marian": (transformers.MarianConfig, transformers.MarianModel),
               "mbart": (transformers.MBartConfig, transformers.MBartModel)}[name]
        return cls[1](cls[0](**seq2seq)), {"input_ids": _ids(), "decoder_input_ids": _ids(2, 5, seed=1)}, 3, 16
    if name == "bloom":  # ALiBi through baddbmm, scores viewed to add the mask and viewed back
        cfg = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=2, **small)
        return transformers.BloomForCausalLM(cfg), {"input_ids": _ids()}, 2, 16
    causal_lm = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, **small)
    if name == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(intermediate_size=64, **causal_lm)
        return transformers.GPTNeoXForCausalLM(cfg), {"input_ids": _ids()}, 2, 16
    if name == "opt":
        cfg = transformers.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **causal_lm)
        return transformers.OPTForCausalLM(cfg), {"input_ids": _ids()}, 2, 16
    if name == "phi":
        cfg = transformers.PhiConfig(intermediate_size=64, **causal_lm)
        return transformers.PhiForCausalLM(cfg), {"input_ids": _ids()}, 2, 16
    if name == "stablelm":
        cfg = transformers.StableLmConfig(intermediate_size=64, num_key_value_heads=1, **causal_lm)
        return transformers.StableLmForCausalLM(cfg), {"input_ids": _ids()}, 2, 16
    if name in ("gemma2", "gemma2_softcap"):  # the soft-capped variant must stay dense (tanh is not attention)
        cfg = transformers.Gemma2Config(intermediate_size=64, num_key_value_heads=1, head_dim=16,
                                        attn_logit_softcapping=50.0 if name == "gemma2_softcap" else None, **causal_lm)
        return transformers.Gemma2ForCausalLM(cfg), {"input_ids": _ids()}, 2, 16
    raise KeyError(name)


MODELS = ["gpt2", "llama", "qwen3", "mistral", "bert", "vit", "whisper", "t5", "bart", "marian", "mbart", "gpt_neox",
          "opt", "phi", "stablelm", "gemma2"]
EAGER_ONLY = {"gemma2", "bloom", "gemma2_softcap"}  # transformers offers no "sdpa" attention for these
CASES = [(name, impl) for name in MODELS for impl in ("eager", "sdpa") if impl == "eager" or name not in EAGER_ONLY]


def reference_copy(model, topk: int):
    """The same weights with every attention computed eagerly by flash_sfa at ``topk``."""
    REFERENCE_TOPK["value"] = topk
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sfa_reference")
    return ref


def _bloom_sfa_attention(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                         output_attentions=False, **kwargs):
    """BloomAttention.forward (transformers 5) with its baddbmm/softmax/bmm computed by flash_sfa: ALiBi and the
    mask as one additive mask, scale inv_norm_factor."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    mask = self.beta * alibi.view(batch_size, self.num_heads, 1, -1)
    if attention_mask is not None:
        mask = mask + attention_mask
    context = flash_sfa(query, key, value, topk=REFERENCE_TOPK["value"], attn_mask=mask, scale=self.inv_norm_factor)
    context = self._merge_heads(context.reshape(batch_size * self.num_heads, q_length, self.head_dim))
    return dropout_add(self.dense(context), residual, self.hidden_dropout, self.training), None


def bloom_reference_copy(model, topk: int):
    """A Bloom model's copy whose attention is computed eagerly by flash_sfa at ``topk`` (Bloom has no
    attention interface for ``reference_copy`` to use)."""
    import types

    from transformers.models.bloom.modeling_bloom import BloomAttention

    REFERENCE_TOPK["value"] = topk
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, BloomAttention):
            module.forward = types.MethodType(_bloom_sfa_attention, module)
    return ref


def tiny_tokenizer(vocab_size: int = 100):
    """A word-level tokenizer over the built-in sentences' most frequent words, made here (no download): ids
    below ``vocab_size``, [UNK] for the rest, [PAD] for padding, [EOS] to end."""
    import collections

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sfa_compile.conversion.textdata import builtin_sentences

    words = collections.Counter(w for s in builtin_sentences() for w in s.split())
    special = ["[UNK]", "[PAD]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(special + [w for w, _ in words.most_common(vocab_size - len(special))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")

"""The Hugging Face config of an LPA model as megatron_lpa trains it (``modeling_lpa.py``).

Written into every factored export (``tools/export_hf.py --format factored``) next to
``modeling_lpa.py`` and loaded with ``trust_remote_code=True``; it imports nothing of megatron_lpa.
Field names are Hugging Face's where a Llama or GPT config has the same setting.
"""

from transformers import PretrainedConfig


class LpaConfig(PretrainedConfig):
    """Shape and form of the model.

    * Variants: ``lpa_attn_rank`` r > 0 makes each of Q, K, V and O a pair ``B(A x)`` of rank r;
      ``lpa_ffn_rank`` does the same for the FFN's projections; 0 keeps a projection dense.
    * Families: LLaMA-style (``normalization="RMSNorm"``, ``gated_mlp=True`` with
      ``hidden_act="silu"``, ``position_embedding_type="rope"``) and GPT-style (``"LayerNorm"``,
      ``"gelu"`` or ``"relu"``, ``"learned_absolute"`` positions, ``bias=True``).
    * Block forms: ``sublayer_norm="input"``, pre-norm plus a final norm; ``"output"``, each
      sublayer's output normalised inside its residual branch, ``x + Norm(f(x))``, no final norm.
    * Biases: ``bias`` on every linear of the blocks (a low-rank Q/K/V or FFN-input projection
      carries it on A's r-wide output, an output projection on B's); ``output_layer_bias`` on the
      output layer.
    """

    model_type = "lpa"

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=2048,
        normalization="RMSNorm",
        norm_eps=1e-5,
        hidden_act="silu",
        gated_mlp=True,
        position_embedding_type="rope",
        rope_theta=10000.0,
        sublayer_norm="input",
        bias=False,
        output_layer_bias=False,
        lpa_attn_rank=0,
        lpa_ffn_rank=0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.sublayer_norm = sublayer_norm
        self.bias = bias
        self.output_layer_bias = output_layer_bias
        self.lpa_attn_rank = lpa_attn_rank
        self.lpa_ffn_rank = lpa_ffn_rank
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

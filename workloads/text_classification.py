"""keras-io's "Text classification with Transformer" (token and position embeddings, one
transformer block): an Embedding model trained with Adam, whose sparse gradients are where
N workers used to train differently from one process. Used by the sparse-gradient benchmark
and the gradient parity tests; generated data, the same on every worker.
"""

from __future__ import annotations

VOCAB = 20000
MAXLEN = 200
EMBED_DIM = 32
NUM_HEADS = 2
FF_DIM = 32


def text_transformer(vocab: int = VOCAB, maxlen: int = MAXLEN, embed_dim: int = EMBED_DIM,
                     num_heads: int = NUM_HEADS, ff_dim: int = FF_DIM, dropout: float = 0.1):
    """keras-io's "Text classification with Transformer" model (token and position
    embedding, one transformer block, pooling, two dense layers), compiled with Adam."""
    import keras

    class TokenAndPositionEmbedding(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.token_emb = keras.layers.Embedding(vocab, embed_dim)
            self.pos_emb = keras.layers.Embedding(maxlen, embed_dim)

        def call(self, x):
            positions = self.pos_emb(keras.ops.arange(0, maxlen))
            return self.token_emb(x) + positions

    class TransformerBlock(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.att = keras.layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
            self.ffn = keras.Sequential([keras.layers.Dense(ff_dim, activation="relu"),
                                         keras.layers.Dense(embed_dim)])
            self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6)
            self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6)
            self.dropout1 = keras.layers.Dropout(dropout)
            self.dropout2 = keras.layers.Dropout(dropout)

        def call(self, inputs):
            attention = self.dropout1(self.att(inputs, inputs))
            out1 = self.layernorm1(inputs + attention)
            return self.layernorm2(out1 + self.dropout2(self.ffn(out1)))

    inputs = keras.Input((maxlen,))
    x = TransformerBlock()(TokenAndPositionEmbedding()(inputs))
    x = keras.layers.Dropout(dropout)(keras.layers.GlobalAveragePooling1D()(x))
    x = keras.layers.Dropout(dropout)(keras.layers.Dense(20, activation="relu")(x))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def text_data(samples: int, vocab: int = VOCAB, maxlen: int = MAXLEN, seed: int = 0):
    """Generated token ids and binary labels, the same on every worker."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.integers(1, vocab, size=(samples, maxlen)).astype("int32"),
            rng.integers(0, 2, size=(samples,)).astype("int32"))

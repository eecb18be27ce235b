"""Worker functions for tests/keras_compat/test_gradient_parity.py: many small training cases in one process.

`run(cases)` trains each case in turn in the same process (one cluster for all)
on the same global batches and returns each case's weights after training, or
the error that refused it and the steps taken before it. The test compares a
2-worker run with a 1-process run of the same cases (`max|w_N - w_1| /
max(1, |w_1|)`, see docs/keras_compat.md#gradient_parity).
"""

from __future__ import annotations

import numpy as np

GLOBAL_BATCH = 8
STEPS = 3
VOCAB = 16
SEQ = 6
FEATURES = 6

OPTIONS = {
    "clipnorm": {"clipnorm": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.05},
    "clipvalue": {"clipvalue": 0.005},
    "ema": {"use_ema": True, "ema_momentum": 0.5},
    "ema_overwrite": {"use_ema": True, "ema_momentum": 0.5, "ema_overwrite_frequency": 2},
    "accumulation": {"gradient_accumulation_steps": 2},
}

CASES: dict[str, dict] = {
    # name: model, optimizer, options (OPTIONS keys), extras
    "dense-sgd": {"model": "dense", "optimizer": "sgd"},
    "dense-adam": {"model": "dense", "optimizer": "adam"},
    "dense-sgd-clipnorm": {"model": "dense", "optimizer": "sgd", "options": "clipnorm"},
    "dense-adam-clipnorm": {"model": "dense", "optimizer": "adam", "options": "clipnorm"},
    "dense-sgd-global_clipnorm": {"model": "dense", "optimizer": "sgd",
                                  "options": "global_clipnorm"},
    "dense-adamw-global_clipnorm": {"model": "dense", "optimizer": "adamw",
                                    "options": "global_clipnorm"},
    "dense-sgd-clipvalue": {"model": "dense", "optimizer": "sgd", "options": "clipvalue"},
    "dense-adam-ema": {"model": "dense", "optimizer": "adam", "options": "ema"},
    "dense-sgd-regularizers": {"model": "dense", "optimizer": "sgd", "regularizers": True},
    "dense-adam-ema_overwrite": {"model": "dense", "optimizer": "adam",
                                 "options": "ema_overwrite"},
    "dense-sgd-sample_weight": {"model": "dense", "optimizer": "sgd", "weights": "sample"},
    "dense-adam-class_weight": {"model": "dense", "optimizer": "adam", "weights": "class"},
    "dense-sgd-variable_metric": {"model": "dense", "optimizer": "sgd", "metric": True},
    "multi_output-adam": {"model": "multi_output", "optimizer": "adam"},
    "embedding-adam": {"model": "embedding", "optimizer": "adam"},
    "embedding-adamw-clipnorm": {"model": "embedding", "optimizer": "adamw",
                                 "options": "clipnorm"},
    "batchnorm-adam-clipnorm": {"model": "batchnorm", "optimizer": "adam",
                                "options": "clipnorm"},
    "rnn-adam": {"model": "rnn", "optimizer": "adam"},
    "transformer-adam": {"model": "transformer", "optimizer": "adam"},  # keras-io's model
    "transformer-adamw-global_clipnorm": {"model": "transformer", "optimizer": "adamw",
                                          "options": "global_clipnorm"},
    "dense-sgd-mixed_float16": {"model": "dense", "optimizer": "sgd", "policy": "mixed_float16"},
    "embedding-adam-mixed_float16": {"model": "embedding", "optimizer": "adam",
                                     "policy": "mixed_float16"},
    "dense-sgd-loss_scale_overflow": {"model": "dense", "optimizer": "sgd",
                                      "policy": "mixed_float16", "overflow": True},
    "dense-sgd-accumulation": {"model": "dense", "optimizer": "sgd", "options": "accumulation"},
    # A train_step of one's own, written as Keras's guide "Customizing what happens in fit()"
    # writes it (compute_loss, optimizer.apply).
    "custom_train_step-adam-clipnorm": {"model": "custom_step", "optimizer": "adam",
                                        "options": "clipnorm"},
}
"""The matrix; a case's tolerance is 1e-4, 2e-3 under a 16-bit policy."""


def _data(model: str):
    rng = np.random.default_rng(5)
    n = GLOBAL_BATCH * STEPS
    if model == "transformer":
        from workloads.text_classification import text_data

        return text_data(n, vocab=VOCAB, maxlen=SEQ, seed=5)
    if model == "embedding":
        x = rng.integers(0, VOCAB, size=(n, SEQ)).astype("int32")
    elif model == "rnn":
        x = rng.normal(size=(n, SEQ, 3)).astype("float32")
    else:
        x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = rng.integers(0, 2, size=(n,)).astype("float32")
    return x, y


def _token_and_position_embedding():
    import keras

    class TokenAndPositionEmbedding(keras.layers.Layer):
        """keras-io's "Text classification with Transformer" embedding: the position
        embedding's gradient holds each position once per replica."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.tokens = keras.layers.Embedding(VOCAB, 4)
            self.positions = keras.layers.Embedding(SEQ, 4)

        def call(self, x):
            return self.tokens(x) + self.positions(keras.ops.arange(SEQ))

    return TokenAndPositionEmbedding()


def _custom_step_model():
    """A functional model whose `train_step` is the user's, as in Keras's guide."""
    import keras
    import tensorflow as tf

    class CustomStep(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(y=y, y_pred=y_pred)
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                else:
                    metric.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return CustomStep(inputs, keras.layers.Dense(1, activation="sigmoid")(h))


def _model(kind: str, regularizers: bool, linear: bool):
    import keras

    if kind == "custom_step":
        return _custom_step_model()
    reg = keras.regularizers.L2(0.01) if regularizers else None
    head = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="head")
    if kind == "dense":
        inputs = keras.Input((FEATURES,))
        h = keras.layers.Dense(8, activation=None if linear else "tanh", kernel_regularizer=reg,
                               activity_regularizer=reg)(inputs)
        return keras.Model(inputs, head(h))
    if kind == "multi_output":
        inputs = keras.Input((FEATURES,))
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        return keras.Model(inputs, {"a": keras.layers.Dense(1, name="a")(h),
                                    "b": keras.layers.Dense(1, activation="sigmoid",
                                                            name="b")(h)})
    if kind == "batchnorm":
        inputs = keras.Input((FEATURES,))
        h = keras.layers.Dense(8, use_bias=False)(inputs)
        h = keras.layers.BatchNormalization(synchronized=True)(h)
        return keras.Model(inputs, head(keras.layers.Activation("relu")(h)))
    if kind == "rnn":
        inputs = keras.Input((SEQ, 3))
        return keras.Model(inputs, head(keras.layers.LSTM(4)(inputs)))
    inputs = keras.Input((SEQ,), dtype="int32")
    h = _token_and_position_embedding()(inputs)
    return keras.Model(inputs, head(keras.layers.GlobalAveragePooling1D()(h)))


def _variable_metric():
    """A metric in the older style whose `result()` returns its variable."""
    import keras

    class SumOfPredictions(keras.metrics.Metric):
        def __init__(self, name="sum_of_predictions", **kwargs):
            super().__init__(name=name, **kwargs)
            self.total = self.add_variable((), initializer="zeros", name="total")

        def update_state(self, y_true, y_pred, sample_weight=None):
            self.total.assign_add(keras.ops.sum(keras.ops.cast(y_pred, "float32")))

        def result(self):
            return self.total

    return SumOfPredictions()


def _optimizer(name: str, options: dict):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(0.1, **options)
    if name == "adam":
        return keras.optimizers.Adam(0.01, **options)
    return keras.optimizers.AdamW(0.01, weight_decay=0.1, **options)


def train_case(strategy, spec: dict) -> dict:
    """Trains one case for `STEPS` global batches; its weights, or the error that refused
    it and the optimizer's iterations when it did."""
    import keras
    import tensorflow as tf

    policy = spec.get("policy")
    keras.config.set_dtype_policy(policy or "float32")
    try:
        with strategy.scope():
            keras.utils.set_random_seed(1)
            if spec["model"] == "transformer":  # keras-io's; dropout draws per replica: off
                from workloads.text_classification import text_transformer

                model = text_transformer(VOCAB, SEQ, embed_dim=4, num_heads=2, ff_dim=8,
                                         dropout=0.0)
            else:
                model = _model(spec["model"], spec.get("regularizers", False),
                           spec.get("overflow", False))
            optimizer = _optimizer(spec["optimizer"], OPTIONS.get(spec.get("options"), {}))
            if policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            if spec["model"] == "transformer":
                model.compile(optimizer, "sparse_categorical_crossentropy")
            elif spec["model"] == "multi_output":
                model.compile(optimizer, {"a": "mse", "b": "binary_crossentropy"},
                              loss_weights={"a": 0.5, "b": 1.0})
            else:
                model.compile(optimizer, "binary_crossentropy",
                              metrics=[_variable_metric()] if spec.get("metric") else None)
        x, y = _data(spec["model"])
        targets = {"a": y, "b": y} if spec["model"] == "multi_output" else y
        parts = (x, targets)
        if spec.get("overflow"):  # the second half of each batch: float16 overflows there
            x[np.arange(len(x)) % GLOBAL_BATCH >= GLOBAL_BATCH // 2] *= 40
        if spec.get("weights") == "sample":
            parts += (np.linspace(0.5, 1.5, len(y)).astype("float32"),)
        dataset = tf.data.Dataset.from_tensor_slices(parts).batch(GLOBAL_BATCH)
        class_weight = {0: 0.7, 1: 1.3} if spec.get("weights") == "class" else None
        try:
            history = model.fit(dataset, epochs=1, verbose=0, class_weight=class_weight)
        except Exception as e:  # noqa: BLE001 - a refusal is the case's result
            return {"error": f"{type(e).__name__}: {e}"[:1500],
                    "iterations": int(model.optimizer.iterations.numpy())}
        return {"weights": [np.asarray(v.numpy(), dtype="float64").ravel().tolist()
                            for v in model.weights],
                "history": history.history}
    finally:
        keras.config.set_dtype_policy("float32")


def run(cases: list[str], skip_fixes: list[str] = (), timeout_seconds: float = 30) -> dict:
    """Trains `cases` (names in `CASES`) in order in this process, on a strategy whose
    collectives time out after `timeout_seconds` (so a case that hangs fails)."""
    import os

    os.environ["TF_DETERMINISTIC_OPS"] = "1"
    from disttrain import keras_compat
    from disttrain.distribute import strategy as make_strategy

    if skip_fixes:
        keras_compat.apply(skip=tuple(skip_fixes))
    strategy = make_strategy(timeout_seconds=timeout_seconds)
    return {name: train_case(strategy, CASES[name]) for name in cases}

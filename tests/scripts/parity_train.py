"""A small disttrain training script for the parity check's tests: shuffled NumPy arrays,
a global seed, Adam; `--batchnorm` adds a BatchNormalization without synchronized=True."""

import argparse

import keras
import numpy as np

import disttrain

parser = argparse.ArgumentParser()
parser.add_argument("--batchnorm", action="store_true")
args = parser.parse_args()

keras.utils.set_random_seed(0)
strategy = disttrain.strategy()
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")
with strategy.scope():
    layers = [keras.Input((8,)), keras.layers.Dense(16, activation="relu")]
    if args.batchnorm:
        layers.append(keras.layers.BatchNormalization())
    model = keras.Sequential([*layers, keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), "mse")
model.fit(x, y, batch_size=32, epochs=3, verbose=0)
print("trained")

"""`main.py` of TensorFlow's "Multi-worker training with Keras" tutorial.

Source: https://github.com/tensorflow/docs/blob/master/site/en/tutorials/distribute/multi_worker_with_keras.ipynb
(the `%%writefile main.py` cell; read at commit 7c365021, 2026-03-11), Apache License 2.0.
Kept as published but for these changes:

- the documented disttrain swap: `strategy = disttrain.strategy()` instead of
  `tf.distribute.MultiWorkerMirroredStrategy()`;
- `fit(..., epochs=2, steps_per_epoch=4)` instead of `epochs=3, steps_per_epoch=70`.

Its data comes from `mnist_setup.py` (generated instead of downloaded).
"""

import os
import json

import tensorflow as tf
import mnist_setup

import disttrain

per_worker_batch_size = 64
tf_config = json.loads(os.environ['TF_CONFIG'])
num_workers = len(tf_config['cluster']['worker'])

strategy = disttrain.strategy()

global_batch_size = per_worker_batch_size * num_workers
multi_worker_dataset = mnist_setup.mnist_dataset(global_batch_size)

with strategy.scope():
  # Model building/compiling need to be within `strategy.scope()`.
  multi_worker_model = mnist_setup.build_and_compile_cnn_model()


multi_worker_model.fit(multi_worker_dataset, epochs=2, steps_per_epoch=4)
